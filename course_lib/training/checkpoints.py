"""Checkpoints and outputs: the final model written all or nothing, and finding a complete checkpoint."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from course_lib.model.layout import save_llava
from course_lib.model.lora import PROJECTOR
from course_lib.model.partial_lora import ATTR as PARTIAL_LORA_ATTR
from course_lib.model.partial_lora import save_partial_lora
from course_lib.serving.loading import PREPROCESSING_FILE
from course_lib.training.arguments import PROJECTOR_FILE, DataArguments, ModelArguments
from course_lib.training.zero import whole_parameters

if TYPE_CHECKING:
    from transformers import ProcessorMixin, Trainer

SUMMARY = "training_summary.json"  # written last: its presence marks a finished run
TRAINER_STATE = "trainer_state.json"  # the Trainer writes it last into a checkpoint: a complete save has it
# The files that make a folder a model for the loaders (course_lib.serving.loading, vLLM, from_pretrained).
MODEL_FILES = ("config.json", "generation_config.json", "model.safetensors", "model.safetensors.index.json",
               "pytorch_model.bin", "pytorch_model.bin.index.json", "adapter_config.json", "adapter_model.safetensors",
               "adapter_model.bin", "partial_lora.safetensors", "partial_lora.json", PROJECTOR_FILE, PREPROCESSING_FILE)
MODEL_SHARDS = ("model-*-of-*.safetensors", "pytorch_model-*-of-*.bin")


def publish_model(staging: Path, out: Path) -> list[str]:
    """Move a staged model into `out` as a whole; returns the names of the earlier output's files removed.

    Each file is renamed into place (a kill leaves whole files only). Model files that an earlier output left
    in `out` and the new one does not have are removed first: a full model trained into a folder that held a
    LoRA output would otherwise sit next to the old adapter_config.json, and every loader would serve the
    old adapter on its old base. Checkpoints, logs and other files in `out` are left alone.
    """
    new = {f.name for f in staging.iterdir()}
    stale = [f for f in out.iterdir() if f.is_file() and f.name not in new
             and (f.name in MODEL_FILES or any(f.match(g) for g in MODEL_SHARDS))]
    for f in stale:
        f.unlink()
    for f in staging.iterdir():
        os.replace(f, out / f.name)
    shutil.rmtree(staging)
    return sorted(f.name for f in stale)


def latest_complete_checkpoint(output_dir: str | Path) -> str | None:
    """The newest `checkpoint-N` whose trainer_state.json exists, or None.

    transformers' `get_last_checkpoint` returns the newest `checkpoint-N` folder; the Trainer writes
    trainer_state.json last, so when that file is missing the save was cut off (kill -9 mid-save) and the
    newest complete one before it is the one to resume from.
    """
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint

    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return None
    last = get_last_checkpoint(str(output_dir))
    if last is None or is_complete_checkpoint(last):
        return last
    complete = [p for p in output_dir.glob(f"{PREFIX_CHECKPOINT_DIR}-*")
                if p.name.split("-")[-1].isdigit() and is_complete_checkpoint(p)]
    return str(max(complete, key=lambda p: int(p.name.split("-")[-1]))) if complete else None


def check_resume(resume: str | None) -> None:
    """`--resume_from_checkpoint`: 'auto', or an existing and complete checkpoint; else a TrainSetupError."""
    from course_lib.training.trainable import TrainSetupError

    if not resume or resume == "auto":
        return
    if not Path(resume).is_dir():
        raise TrainSetupError(f"--resume_from_checkpoint {resume}: no such checkpoint folder "
                              "(or pass 'auto' for the newest complete one in --output_dir)")
    if not is_complete_checkpoint(resume):
        raise TrainSetupError(f"--resume_from_checkpoint {resume}: not a complete checkpoint (no whole "
                              f"{TRAINER_STATE}: a save was interrupted?); pass 'auto' for the newest complete one")


def is_complete_checkpoint(folder: str | Path) -> bool:
    """The Trainer writes trainer_state.json last, and not atomically: complete means it is there and whole."""
    try:
        return isinstance(json.loads((Path(folder) / TRAINER_STATE).read_text()), dict)
    except (OSError, ValueError):
        return False


def save_outputs(trainer: Trainer, processor: ProcessorMixin, margs: ModelArguments, dargs: DataArguments,
                 out: Path) -> None:
    """Write the final model atomically per file: staged in a hidden folder, then moved in place."""
    from safetensors.torch import save_file

    staging = out / ".final.partial"
    base = trainer.model.get_base_model() if hasattr(trainer.model, "get_base_model") else trainer.model
    base.config.text_config.use_cache = True  # saved for inference
    adapters = base._modules.pop(PARTIAL_LORA_ATTR, None)  # kept out of the standard checkpoint
    weights = {}
    try:
        if base is not trainer.model:  # a PEFT model: the Trainer writes the adapter
            trainer.save_model(str(staging))  # all ranks: DeepSpeed may need to gather
        else:  # all ranks: under ZeRO-3 the weights are gathered from every rank's slice (to rank 0)
            weights = trainer.accelerator.get_state_dict(trainer.deepspeed if trainer.is_deepspeed_enabled else base)
            if trainer.is_world_process_zero():
                save_llava(base, staging, weights)
    finally:
        if adapters is not None:
            base.add_module(PARTIAL_LORA_ATTR, adapters)
    with whole_parameters(adapters.parameters() if adapters is not None else ()):
        if not trainer.is_world_process_zero():
            return
        if adapters is not None:
            save_partial_lora(base, staging)
    padded = dargs.pad_to_square or bool(getattr(processor.image_processor, "do_pad", False))
    (padding_processor(processor) if padded else processor).save_pretrained(staging)
    # Inference must prepare images as training did (course_lib.serving.loading.read_preprocessing). Padding
    # also lives in the saved processor, where transformers and vLLM read it; tiling is this course's alone.
    (staging / PREPROCESSING_FILE).write_text(json.dumps(
        {"pad_to_square": padded, "image_tiling": dargs.image_tiling}, indent=1))
    (staging / "training_args.bin").unlink(missing_ok=True)  # a pickle; the args are in training_summary.json
    if margs.stage == "pretrain" or margs.train_type != "use_lora":  # LoRA's adapter holds its projector
        prefix = f"model.{PROJECTOR}."  # the stage-1 projector alone, from the weights just saved
        projector = {k[len(prefix):]: v.detach().float().cpu().contiguous() for k, v in weights.items()
                     if k.startswith(prefix)}
        save_file(projector, str(staging / PROJECTOR_FILE), metadata={"format": "pt", "module": PROJECTOR})
    publish_model(staging, out)


def padding_processor(processor: ProcessorMixin) -> ProcessorMixin:
    """A copy of `processor` whose image processor pads to a square itself: transformers' LlavaImageProcessor
    with `do_pad=True`, filled with the mean colour as LLaVA-1.5's `expand2square` does. Anything that loads
    the folder (AutoProcessor, vLLM) then pads as training did; with CLIP's plain image processor it would
    not, since `image_preprocessing.json` is this course's file and nobody else reads it."""
    import copy

    from transformers import LlavaImageProcessor

    from course_lib.util.quiet import quiet_transformers

    settings = processor.image_processor.to_dict()
    padded = copy.copy(processor)
    with quiet_transformers(progress_bars=False):  # without torchvision it says it uses the PIL backend
        padded.image_processor = LlavaImageProcessor.from_dict(
            {**settings, "do_pad": True, "image_processor_type": "LlavaImageProcessor"})
    return padded


def format_summary(summary: dict) -> str:
    lines = [
        "=" * 64,
        f" {summary['stage']} finished" + (f" ({summary['train_type']})" if summary.get("train_type") else ""),
        "=" * 64,
        f" steps            {summary['steps']}  (epochs {summary['epochs']:.2f})",
        f" samples          {summary['samples']}  (skipped/dropped: {summary['skipped'] or 'none'})",
        f" tokens seen      {summary['tokens']:,}",
        f" time             {summary['seconds']:.1f} s",
        f" final loss       {summary['final_loss']:.4f}" if summary["final_loss"] is not None else " final loss  -",
        f" model            {summary['output_dir']}",
        f" loss curve       {summary['loss_curve']}",
        "=" * 64,
    ]
    return "\n".join(lines)
