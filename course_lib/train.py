"""Train a LLaVA: stage 1 (pretrain, projector only) or stage 2 (finetune, one of three train types).

Usually launched by `run_zero2.sh` through DeepSpeed; it also runs as a plain single process:

    python -m course_lib.train --stage pretrain --model_name_or_path tiny \
        --data_path DIR_WITH_chat.json --output_dir runs/pretrain
    python -m course_lib.train --stage finetune --train_type use_lora \
        --model_name_or_path runs/pretrain --data_path data.json --image_folder images --output_dir runs/lora

Every Hugging Face `TrainingArguments` flag is accepted and passed through untouched.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .inference import PREPROCESSING_FILE
from .partial_lora import ATTR as PARTIAL_LORA_ATTR
from .partial_lora import save_partial_lora
from .reporting import SUMMARY, format_summary, latest_complete_checkpoint, plot_loss_curves
from .train_types import PROJECTOR, STAGES, TrainSetupError, normalize_train_type, optimizer_groups, prepare_model

PROJECTOR_FILE = "projector.safetensors"


@dataclass
class ModelArguments:
    model_name_or_path: str = field(default="tiny", metadata={"help": "an (empty) LLaVA folder, or 'tiny'"})
    stage: str = field(default="pretrain", metadata={"help": "pretrain (projector only) or finetune"})
    train_type: str = field(default="use_lora",
                            metadata={"help": "use_lora, freeze_vision, none (full) or partial_lora"})
    pretrain_projector: str | None = field(default=None, metadata={"help": "a stage-1 projector.safetensors"})
    projector_lr: float | None = field(default=None, metadata={"help": "projector LR in stage 2 (LLaVA's "
                                                                          "mm_projector_lr); default: --learning_rate"})
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    attn_implementation: str = field(default="auto", metadata={"help": "auto: flash_attention_2 if installed"})
    check_only: bool = field(default=False, metadata={"help": "validate the arguments and exit"})


@dataclass
class DataArguments:
    data_path: str | None = field(default=None, metadata={"help": "JSON/JSONL file, or a folder with chat.json"})
    image_folder: str | None = field(default=None, metadata={"help": "default: images_dl/ next to chat.json"})
    template: str = field(default="auto", metadata={"help": "plain | chat; auto: plain for pretrain"})
    model_max_length: int = 2048
    packing: bool = field(default=False, metadata={"help": "pack each batch's samples into rows (no padding "
                                                             "between samples); see benchmarks/packing.py"})
    on_bad_sample: str = field(default="skip", metadata={"help": "skip (log and count) or error"})
    pad_to_square: bool = False
    image_tiling: int = field(default=0, metadata={"help": "dynamic resolution: each image becomes up to N tiles "
                                                           "+ a thumbnail (InternVL 1.5); 0 = off"})


# Defaults that differ from the Trainer's; any flag given on the command line wins. The learning
# rates follow LLaVA-1.5 (pretrain 1e-3; finetune 2e-5, LoRA 2e-4), the batch is per device.
def _defaults(stage: str, train_type: str) -> dict[str, str]:
    lr = "1e-3" if stage == "pretrain" else ("2e-4" if "lora" in train_type else "2e-5")
    return {"learning_rate": lr, "per_device_train_batch_size": "16", "num_train_epochs": "1",
            "warmup_steps": "0.03", "lr_scheduler_type": "cosine", "weight_decay": "0.0", "logging_steps": "5",
            "save_strategy": "no", "report_to": "tensorboard", "remove_unused_columns": "false",
            "dataloader_num_workers": "0"}


def _given(argv: list[str], flag: str) -> bool:
    return any(a == f"--{flag}" or a.startswith(f"--{flag}=") for a in argv)


def _value(argv: list[str], flag: str, default: str) -> str:
    for i, a in enumerate(argv):
        if a.startswith(f"--{flag}="):
            return a.split("=", 1)[1]
        if a == f"--{flag}" and i + 1 < len(argv):
            return argv[i + 1]
    return default


def parse_args(argv: list[str]):
    """(model_args, data_args, training_args); one-line TrainSetupError for any user mistake."""
    from transformers import HfArgumentParser, TrainingArguments

    stage = _value(argv, "stage", "pretrain")
    if stage not in STAGES:
        raise TrainSetupError(f"--stage {stage!r} is not one of {', '.join(STAGES)}")
    train_type = normalize_train_type(_value(argv, "train_type", "use_lora"))
    argv = [x for k, v in _defaults(stage, train_type).items() if not _given(argv, k) for x in (f"--{k}", v)] + argv
    argv = _auto_device(argv)
    if not _given(argv, "output_dir"):
        raise TrainSetupError("--output_dir is required")
    _check_deepspeed_config(_value(argv, "deepspeed", ""))
    parser = HfArgumentParser((ModelArguments, DataArguments, TrainingArguments))

    def one_line_error(message: str):  # instead of argparse's usage wall
        raise TrainSetupError(message)

    parser.error = one_line_error
    try:
        margs, dargs, targs = parser.parse_args_into_dataclasses(args=argv)
    except ValueError as err:
        if isinstance(err, TrainSetupError):
            raise
        raise TrainSetupError(str(err).splitlines()[0]) from None
    if not _given(argv, "include_num_input_tokens_seen"):
        targs.include_num_input_tokens_seen = "non_padding"
    margs.train_type = train_type
    if dargs.image_tiling < 0:
        raise TrainSetupError(f"--image_tiling {dargs.image_tiling}: expected 0 (off) or a maximum tile count")
    _check_paths(margs, dargs)
    return margs, dargs, targs


def _check_deepspeed_config(path: str) -> None:
    if not path:
        return
    if not Path(path).is_file():
        raise TrainSetupError(f"--deepspeed {path}: no such file")
    try:
        json.loads(Path(path).read_text())
    except json.JSONDecodeError as err:
        raise TrainSetupError(f"--deepspeed {path}: not valid JSON ({err.msg} at line {err.lineno})") from None


def _check_paths(margs: ModelArguments, dargs: DataArguments) -> None:
    if not dargs.data_path:
        raise TrainSetupError("--data_path is required (a LLaVA JSON/JSONL file or a folder with chat.json)")
    if not Path(dargs.data_path).exists():
        raise TrainSetupError(f"--data_path {dargs.data_path}: no such file or folder")
    if dargs.image_folder and not Path(dargs.image_folder).is_dir():
        raise TrainSetupError(f"--image_folder {dargs.image_folder}: no such folder")
    if margs.model_name_or_path == "tiny":
        if margs.stage == "finetune" and not margs.pretrain_projector:
            raise TrainSetupError("--stage finetune needs a stage-1 output as --model_name_or_path "
                                  "(or --pretrain_projector PATH); 'tiny' has an untrained projector")
        return
    model_dir = Path(margs.model_name_or_path)
    config = model_dir / "config.json"
    if not config.is_file() or json.loads(config.read_text()).get("model_type") != "llava":
        raise TrainSetupError(f"--model_name_or_path {model_dir}: expected a LLaVA folder "
                              "(from `python -m course_lib.build` or a stage-1 run), found no llava config.json")
    if margs.stage == "finetune" and not (margs.pretrain_projector or (model_dir / PROJECTOR_FILE).is_file()):
        raise TrainSetupError(f"--stage finetune: {model_dir} has no stage-1 projector ({PROJECTOR_FILE}); "
                              "run --stage pretrain first or pass --pretrain_projector PATH")
    if margs.pretrain_projector and not Path(margs.pretrain_projector).is_file():
        raise TrainSetupError(f"--pretrain_projector {margs.pretrain_projector}: no such file")


def _auto_device(argv: list[str]) -> list[str]:
    """bf16 on GPUs that support it unless told otherwise; fp32 on CPU, where a GPU command line
    (`--bf16 true`) runs unchanged, with a note. On CPU `--use_cpu` also makes accelerate set up the
    DeepSpeed world from the launcher's ranks (without it, "auto" batch sizes assume one process)."""
    if torch.cuda.is_available():
        unset = not (_given(argv, "bf16") or _given(argv, "fp16"))
        return argv + (["--bf16", "true"] if unset and torch.cuda.is_bf16_supported() else [])
    wants = [f for f in ("bf16", "fp16") if _given(argv, f) and _value(argv, f, "true").lower() in ("true", "1", "yes")]
    if wants:
        _log(f"no CUDA GPU: training in fp32 (--{'/--'.join(wants)} ignored)")
    return argv + [x for f in wants for x in (f"--{f}", "false")] + ["--use_cpu", "true"]


def _precision(targs) -> torch.dtype:
    return torch.bfloat16 if targs.bf16 else (torch.float16 if targs.fp16 else torch.float32)


def _attn_implementation(requested: str) -> str:
    if requested != "auto":
        return requested
    from transformers.utils import is_flash_attn_2_available

    return "flash_attention_2" if torch.cuda.is_available() and is_flash_attn_2_available() else "sdpa"


def load_for_training(margs: ModelArguments, dtype: torch.dtype):
    """The model and processor to train, with the stage-1 projector loaded when one is given."""
    from safetensors.torch import load_file
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    if margs.model_name_or_path == "tiny":
        from .build import build_llava

        model, processor = build_llava("tiny", "tiny")
        model.to(dtype)
    else:
        path = os.path.abspath(margs.model_name_or_path)  # absolute, so a LoRA adapter finds its base
        model = LlavaForConditionalGeneration.from_pretrained(
            path, dtype=dtype, attn_implementation=_attn_implementation(margs.attn_implementation))
        processor = AutoProcessor.from_pretrained(path)
    if margs.pretrain_projector:
        state = load_file(margs.pretrain_projector)
        model.model.multi_modal_projector.load_state_dict(state, strict=True)
    return model, processor


def _make_trainer(model, targs, dataset, collator, projector_lr, callbacks):
    from transformers import Trainer

    class LlavaTrainer(Trainer):
        """Trainer with LLaVA's projector learning rate and length grouping from precomputed lengths."""

        def create_optimizer(self, model=None):
            if self.optimizer is None:
                cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(self.args, self.model)
                kwargs.pop("lr", None)
                groups = optimizer_groups(self.model, self.args.learning_rate, projector_lr, self.args.weight_decay)
                self.optimizer = cls(groups, lr=self.args.learning_rate, **kwargs)
            return self.optimizer

        def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
            # transformers 5 saves Llava checkpoints under the legacy key names (`language_model.model.*`)
            # but the Trainer's resume loads them non-strictly under the new ones: nothing matches and
            # the run silently continues from the old weights. from_pretrained applies the key mapping.
            model = model or self.model
            if hasattr(model, "peft_config") or self.is_deepspeed_enabled:
                return super()._load_from_checkpoint(resume_from_checkpoint, model)
            loaded = type(model).from_pretrained(resume_from_checkpoint, dtype=model.dtype)
            state = loaded.state_dict()
            if hasattr(model, PARTIAL_LORA_ATTR):  # the checkpoint holds the adapters under their own names
                from safetensors.torch import load_file

                for f in Path(resume_from_checkpoint).glob("*.safetensors"):
                    state.update({k: v for k, v in load_file(f).items() if k.startswith(PARTIAL_LORA_ATTR + ".")})
            model.load_state_dict(state, strict=True)

        def _get_train_sampler(self, *args, **kwargs):
            if self.args.train_sampling_strategy == "group_by_length":  # lengths known without opening images
                from .collators import LengthGroupedSampler

                return LengthGroupedSampler(dataset.lengths, self.args.per_device_train_batch_size,
                                            world_size=self.args.world_size, seed=self.args.seed)
            return super()._get_train_sampler(*args, **kwargs)

    return LlavaTrainer(model=model, args=targs, train_dataset=dataset, data_collator=collator, callbacks=callbacks)


def _save_outputs(trainer, processor, margs: ModelArguments, dargs: DataArguments, out: Path) -> None:
    """Write the final model atomically per file: staged in a hidden folder, then moved in place."""
    from safetensors.torch import save_file

    staging = out / ".final.partial"
    base = trainer.model.get_base_model() if hasattr(trainer.model, "get_base_model") else trainer.model
    base.config.text_config.use_cache = True  # saved for inference
    adapters = base._modules.pop(PARTIAL_LORA_ATTR, None)  # kept out of the standard checkpoint
    try:
        trainer.save_model(str(staging))  # all ranks: DeepSpeed may need to gather
    finally:
        if adapters is not None:
            base.add_module(PARTIAL_LORA_ATTR, adapters)
    if adapters is not None and trainer.is_world_process_zero():
        save_partial_lora(base, staging)
    if not trainer.is_world_process_zero():
        return
    processor.save_pretrained(staging)
    # Inference must prepare images as training did (course_lib.inference.read_preprocessing).
    (staging / PREPROCESSING_FILE).write_text(json.dumps(
        {"pad_to_square": dargs.pad_to_square, "image_tiling": dargs.image_tiling}, indent=1))
    (staging / "training_args.bin").unlink(missing_ok=True)  # a pickle; the args are in training_summary.json
    state = {k: v.detach().float().cpu().contiguous()
             for k, v in base.model.multi_modal_projector.state_dict().items()}
    if margs.stage == "pretrain" or margs.train_type != "use_lora":
        save_file(state, str(staging / PROJECTOR_FILE), metadata={"format": "pt", "module": PROJECTOR})
    for f in staging.iterdir():
        os.replace(f, out / f.name)
    shutil.rmtree(staging)


# Printed once per step per rank by DeepSpeed's ZeRO-2 gradient all-gather on recent torch: noise.
warnings.filterwarnings("ignore", message=".*all_gather_into_tensor.*", category=FutureWarning)


def _log(msg: str) -> None:
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"[course_lib.train] {msg}", flush=True)


def run(argv: list[str], callbacks: list | None = None) -> dict:
    """Train as the command line says; returns the summary dict (also written to the output folder)."""
    margs, dargs, targs = parse_args(argv)
    if margs.check_only:
        return {}
    from .collators import PackedCollator, PaddedCollator
    from .data import LlavaDataset
    from .params import format_table, param_table

    dtype = _precision(targs)
    from transformers import set_seed

    set_seed(targs.seed)  # before LoRA's random init, so a run (and its resume) is reproducible
    model, processor = load_for_training(margs, dtype)
    model.config.text_config.use_cache = False  # no KV cache in training (one also disables packed masks)
    model = prepare_model(model, margs.stage, margs.train_type, margs.lora_r, margs.lora_alpha, margs.lora_dropout,
                          gradient_checkpointing=targs.gradient_checkpointing)
    template = dargs.template if dargs.template != "auto" else ("plain" if margs.stage == "pretrain" else "chat")
    dataset = LlavaDataset(dargs.data_path, processor, image_folder=dargs.image_folder, template=template,
                           model_max_length=dargs.model_max_length, on_bad_sample=dargs.on_bad_sample,
                           pad_to_square=dargs.pad_to_square, image_tiling=dargs.image_tiling)
    pad_id = processor.tokenizer.pad_token_id
    # FlashAttention-2 takes one flat row (varlen: no work across samples); SDPA and eager get rows of
    # model_max_length, because their block-diagonal mask is dense and one long row costs T^2.
    flat = getattr(model.config, "_attn_implementation", "") == "flash_attention_2"
    collator = (PackedCollator(max_tokens=dargs.model_max_length * targs.per_device_train_batch_size,
                               row_tokens=None if flat else dargs.model_max_length, pad_token_id=pad_id)
                if dargs.packing else PaddedCollator(pad_token_id=pad_id))
    stage_name = margs.stage + ("" if margs.stage == "pretrain" else f" / {margs.train_type}")
    _log(f"{stage_name}: {len(dataset)} samples, template {template}, {dtype}, "
         f"attention {getattr(model.config, '_attn_implementation', '?')}\n" + format_table(param_table(model)))

    out = Path(targs.output_dir)
    resume = targs.resume_from_checkpoint
    if resume == "auto":
        resume = latest_complete_checkpoint(out)
        _log(f"resuming from {resume}" if resume else "no complete checkpoint to resume from: starting fresh")
    trainer = _make_trainer(model, targs, dataset, collator, margs.projector_lr, callbacks)
    start = time.time()
    result = trainer.train(resume_from_checkpoint=resume)
    _save_outputs(trainer, processor, margs, dargs, out)
    losses = [(h["step"], h["loss"]) for h in trainer.state.log_history if "loss" in h]
    summary = {"stage": margs.stage, "train_type": margs.train_type if margs.stage == "finetune" else None,
               "steps": trainer.state.global_step, "epochs": trainer.state.epoch or 0.0, "samples": len(dataset),
               "skipped": dict(dataset.stats), "tokens": int(trainer.state.num_input_tokens_seen or 0),
               "seconds": time.time() - start, "final_loss": losses[-1][1] if losses else result.training_loss,
               "train_loss": result.training_loss, "losses": losses, "output_dir": str(out),
               "loss_curve": str(out / "loss_curve.png"), "param_table": param_table(model),
               "args": {**asdict(margs), **asdict(dargs)}}
    if trainer.is_world_process_zero():
        plot_loss_curves({stage_name: losses}, title=f"{stage_name} loss").savefig(out / "loss_curve.png", dpi=100)
        (out / SUMMARY).write_text(json.dumps(summary, indent=1))  # written last: marks a finished run
        _log("\n" + format_summary(summary))
    return summary


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    from .records import DataError

    try:
        run(argv)
    except (TrainSetupError, DataError) as err:  # user mistakes: one line, no traceback
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
