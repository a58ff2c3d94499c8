"""`course_lib.train`'s arguments: the course's own flags, Hugging Face's `TrainingArguments`, and checks
that turn every user mistake into one line before any model loads."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from course_lib.serving.loading import is_llava_folder
from course_lib.training.llava_flags import translate_llava_flags
from course_lib.training.recipes import STAGES, trainer_defaults
from course_lib.training.trainable import TrainSetupError, normalize_train_type
from course_lib.util.cli import first_line

if TYPE_CHECKING:
    from transformers import TrainingArguments

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
    preprocessing_num_workers: int | None = field(default=None, metadata={
        "help": "processes that tokenize the data the first time it is indexed (default: up to 8 CPUs for "
                "20,000+ records); later launches read the index"})
    eval_data_path: str | None = field(default=None, metadata={
        "help": "held-out LLaVA JSON/JSONL: its loss is the validation loss, each epoch unless --eval_strategy says "
                "otherwise (LLaVA's scripts have none; overfitting shows here first)"})
    eval_image_folder: str | None = field(default=None, metadata={"help": "default: as --image_folder"})
    group_by_modality_length: bool = field(default=False, metadata={
        "help": "LLaVA's flag: length-grouped batches that never mix image and text-only samples"})


def _given(argv: list[str], flag: str) -> bool:
    return any(a == f"--{flag}" or a.startswith(f"--{flag}=") for a in argv)


def _value(argv: list[str], flag: str, default: str) -> str:
    for i, a in enumerate(argv):
        if a.startswith(f"--{flag}="):
            return a.split("=", 1)[1]
        if a == f"--{flag}" and i + 1 < len(argv):
            return argv[i + 1]
    return default


def parse_args(argv: list[str]) -> tuple[ModelArguments, DataArguments, TrainingArguments]:
    """(model_args, data_args, training_args); one-line TrainSetupError for any user mistake."""
    from transformers import HfArgumentParser, TrainingArguments

    argv, notes = translate_llava_flags(argv)  # LLaVA-1.5's own scripts pass LLaVA's flags
    for note in notes:
        log(f"LLaVA flag: {note}")
    stage = _value(argv, "stage", "pretrain")
    if stage not in STAGES:
        raise TrainSetupError(f"--stage {stage!r} is not one of {', '.join(STAGES)}")
    train_type = normalize_train_type(_value(argv, "train_type", "use_lora"))
    defaults = trainer_defaults(stage, train_type)
    argv = [x for k, v in defaults.items() if not _given(argv, k) for x in (f"--{k}", v)] + argv
    argv = _auto_device(argv)
    if _given(argv, "eval_data_path"):  # a validation loss, not validation logits: those would be T x vocab each
        argv += [x for k, v in (("eval_strategy", "epoch"), ("prediction_loss_only", "true")) if not _given(argv, k)
                 for x in (f"--{k}", v)]
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
        raise TrainSetupError(first_line(err)) from None
    if not _given(argv, "include_num_input_tokens_seen"):
        targs.include_num_input_tokens_seen = "non_padding"
    margs.train_type = train_type
    _check_numbers(margs, dargs, targs)
    _check_paths(margs, dargs)
    _check_outputs(targs)
    _check_reporting(targs)
    _check_attention(margs)
    return margs, dargs, targs


def _check_attention(margs: ModelArguments) -> None:
    """`--attn_implementation flash_attention_2` without its package (or a GPU) failed in every rank, as a bug."""
    from transformers.utils import is_flash_attn_2_available

    if margs.attn_implementation == "flash_attention_2" and not (torch.cuda.is_available()
                                                                  and is_flash_attn_2_available()):
        raise TrainSetupError("--attn_implementation flash_attention_2 needs a CUDA GPU and the flash-attn package "
                              "(pip install flash-attn --no-build-isolation); use --attn_implementation sdpa")


def _check_reporting(targs: TrainingArguments) -> None:
    """`--report_to wandb` (LLaVA's scripts) without wandb installed failed only once the model had loaded."""
    from transformers.integrations import get_available_reporting_integrations

    available = get_available_reporting_integrations()
    missing = [name for name in targs.report_to or [] if name not in ("none", "all") and name not in available]
    if missing:
        raise TrainSetupError(f"--report_to {','.join(missing)}: not installed (pip install {' '.join(missing)}); "
                              f"installed: {', '.join(available) or 'none'}; or pass --report_to none")


def _check_numbers(margs: ModelArguments, dargs: DataArguments, targs: TrainingArguments) -> None:
    """Values Hugging Face accepts but that would crash minutes later, or train silently wrong."""
    positive = {"per_device_train_batch_size": targs.per_device_train_batch_size,
                "gradient_accumulation_steps": targs.gradient_accumulation_steps,
                "learning_rate": targs.learning_rate, "lora_r": margs.lora_r, "lora_alpha": margs.lora_alpha}
    if margs.projector_lr is not None:
        positive["projector_lr"] = margs.projector_lr
    for flag, value in positive.items():
        if not value > 0:
            raise TrainSetupError(f"--{flag} {value}: expected a positive number")
    if targs.max_steps == 0 or targs.max_steps < -1:  # 0 silently trained one step
        raise TrainSetupError(f"--max_steps {targs.max_steps}: expected a positive number of steps "
                              "(or -1, the default, to train for --num_train_epochs)")
    if targs.max_steps == -1 and not targs.num_train_epochs > 0:
        raise TrainSetupError(f"--num_train_epochs {targs.num_train_epochs}: expected a positive number")
    if not 0 <= margs.lora_dropout < 1:
        raise TrainSetupError(f"--lora_dropout {margs.lora_dropout}: expected a probability in [0, 1)")
    if dargs.model_max_length < 16:  # the chat template alone takes about 10 tokens
        raise TrainSetupError(f"--model_max_length {dargs.model_max_length}: too short for any sample; "
                              "expected at least 16 (LLaVA-1.5 uses 2048)")
    if dargs.image_tiling < 0:
        raise TrainSetupError(f"--image_tiling {dargs.image_tiling}: expected 0 (off) or a maximum tile count")


def _check_outputs(targs: TrainingArguments) -> None:
    """The output folder can be written (a named checkpoint is checked by `checkpoints.check_resume`)."""
    from course_lib.util.files import check_writable

    check_writable(targs.output_dir, "--output_dir", folder=True)


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
    if dargs.eval_data_path and not Path(dargs.eval_data_path).exists():
        raise TrainSetupError(f"--eval_data_path {dargs.eval_data_path}: no such file or folder")
    if margs.model_name_or_path == "tiny":
        if margs.stage == "finetune" and not margs.pretrain_projector:
            raise TrainSetupError("--stage finetune needs a stage-1 output as --model_name_or_path "
                                  "(or --pretrain_projector PATH); 'tiny' has an untrained projector")
        return
    model_dir = Path(margs.model_name_or_path)
    if not is_llava_folder(model_dir):
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
    wants = [f for f in ("bf16", "fp16", "tf32")
             if _given(argv, f) and _value(argv, f, "true").lower() in ("true", "1", "yes")]
    if wants:
        log(f"no CUDA GPU: training in fp32 (--{'/--'.join(wants)} ignored)")
    return argv + [x for f in wants for x in (f"--{f}", "false")] + ["--use_cpu", "true"]


def precision(targs: TrainingArguments) -> torch.dtype:
    return torch.bfloat16 if targs.bf16 else (torch.float16 if targs.fp16 else torch.float32)


def attn_implementation(requested: str) -> str:
    if requested != "auto":
        return requested
    from transformers.utils import is_flash_attn_2_available

    return "flash_attention_2" if torch.cuda.is_available() and is_flash_attn_2_available() else "sdpa"




def log(msg: str) -> None:
    """One line from rank 0 only (every rank runs the same code under DeepSpeed)."""
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"[course_lib.train] {msg}", flush=True)


def check_tiling_fits(dargs: DataArguments, tokens_per_image: int) -> None:
    """With `--image_tiling N` one image can become N tiles + a thumbnail: at CLIP-L/336's 576 tokens a tile,
    N = 4 is 2880 tokens, over a 2048 `--model_max_length`, and every such sample would be dropped as too
    long. Refuse up front, naming both flags, instead of training on what is left."""
    if not dargs.image_tiling:
        return
    worst = (dargs.image_tiling + 1) * tokens_per_image
    if worst > dargs.model_max_length:
        fits = max(dargs.model_max_length // tokens_per_image - 1, 0)
        raise TrainSetupError(f"--image_tiling {dargs.image_tiling}: one image can take {dargs.image_tiling} tiles + a "
                              f"thumbnail = {worst} tokens ({tokens_per_image} each), over --model_max_length "
                              f"{dargs.model_max_length}; raise --model_max_length to at least {worst + 64} or use "
                              f"--image_tiling {fits} or less" + (" (0 = off)" if fits <= 1 else ""))
