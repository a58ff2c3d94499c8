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
import sys
import time
import warnings
from dataclasses import asdict
from pathlib import Path

from course_lib.data.image_tokens import image_token_count
from course_lib.data.index import check_records
from course_lib.lessons.scoreboard import plot_loss_curves
from course_lib.model.packed_attention import use_for_packing
from course_lib.training.arguments import check_tiling_fits, log, parse_args, precision
from course_lib.training.build_locks import clear_stale_build_locks
from course_lib.training.checkpoints import (
    SUMMARY,
    check_resume,
    format_summary,
    latest_complete_checkpoint,
    save_outputs,
)
from course_lib.training.runs import RECIPE, recipe_of
from course_lib.training.safe_loading import weights_only_loading
from course_lib.training.trainable import prepare_model
from course_lib.training.trainer import load_model, load_processor, make_trainer
from course_lib.training.zero import peak_memory_gib
from course_lib.util.cli import command
from course_lib.util.files import atomic_write_json

# Printed once per step per rank by DeepSpeed's ZeRO-2 gradient all-gather on recent torch: noise.
warnings.filterwarnings("ignore", message=".*all_gather_into_tensor.*", category=FutureWarning)


def run(argv: list[str], callbacks: list | None = None) -> dict:
    """Train as the command line says; returns the summary dict (also written to the output folder)."""
    margs, dargs, targs = parse_args(argv)
    check_resume(targs.resume_from_checkpoint)
    if margs.check_only:  # run_zero2.sh, before launching ranks that would each print the same error
        check_records(dargs.data_path, dargs.image_folder)
        # A leftover op-build lock would make the ranks wait forever, printing nothing (run_zero2.sh says
        # whether other nodes may share the build folder).
        for line in clear_stale_build_locks(one_node=os.environ.get("COURSE_ONE_NODE", "1") == "1"):
            log(line)
        return {}
    recipe = recipe_of(argv)  # before training: the fingerprint of the folder it starts from, as it is now
    from course_lib.data.collators import PackedCollator, PaddedCollator
    from course_lib.data.dataset import LlavaDataset
    from course_lib.model.parameters import format_table, param_table

    dtype = precision(targs)
    if targs.deepspeed:  # ZeRO-3 partitions the model over the ranks while from_pretrained builds it
        import deepspeed

        deepspeed.init_distributed()
    from transformers import set_seed

    set_seed(targs.seed)  # so a run (and its resume) is reproducible
    # The processor and the data first: a mistake in either costs seconds, not a model load.
    processor = load_processor(margs)
    check_tiling_fits(dargs, image_token_count(processor))
    template = dargs.template if dargs.template != "auto" else ("plain" if margs.stage == "pretrain" else "chat")
    data_start = time.time()
    dataset = LlavaDataset(dargs.data_path, processor, image_folder=dargs.image_folder, template=template,
                           model_max_length=dargs.model_max_length, on_bad_sample=dargs.on_bad_sample,
                           pad_to_square=dargs.pad_to_square, image_tiling=dargs.image_tiling,
                           num_proc=dargs.preprocessing_num_workers)
    validation = LlavaDataset(dargs.eval_data_path, processor, template=template,
                              image_folder=dargs.eval_image_folder or dargs.image_folder,
                              model_max_length=dargs.model_max_length, on_bad_sample=dargs.on_bad_sample,
                              pad_to_square=dargs.pad_to_square,
                              image_tiling=dargs.image_tiling) if dargs.eval_data_path else None
    data_seconds = time.time() - data_start
    model = load_model(margs, dtype)
    model.config.text_config.use_cache = False  # no KV cache in training (one also disables packed masks)
    # SDPA attends per sample inside each packed row: same numbers, no cross-sample work.
    per_sample = dargs.packing and use_for_packing(model)
    set_seed(targs.seed)  # again: LoRA's init must not depend on what loading drew (ZeRO-3's zero.Init does)
    model = prepare_model(model, margs.stage, margs.train_type, margs.lora_r, margs.lora_alpha, margs.lora_dropout,
                          gradient_checkpointing=targs.gradient_checkpointing)
    pad_id = processor.tokenizer.pad_token_id
    # FlashAttention-2 (varlen) and our per-sample SDPA take one flat row: no work across samples, and no
    # padding at all. Eager gets rows of model_max_length: its block-diagonal mask is dense, so one long row
    # would cost T^2.
    flat = per_sample or getattr(model.config, "_attn_implementation", "") == "flash_attention_2"
    collator = (PackedCollator(max_tokens=dargs.model_max_length * targs.per_device_train_batch_size,
                               row_tokens=None if flat else dargs.model_max_length, pad_token_id=pad_id)
                if dargs.packing else PaddedCollator(pad_token_id=pad_id))
    stage_name = margs.stage + ("" if margs.stage == "pretrain" else f" / {margs.train_type}")
    attention = getattr(model.config.text_config, "_attn_implementation", "?")
    log(f"{stage_name}: {len(dataset)} samples (data ready in {data_seconds:.1f} s), template {template}, {dtype}, "
        f"attention {attention}\n"
        + format_table(param_table(model)))

    out = Path(targs.output_dir)
    resume = targs.resume_from_checkpoint
    if resume == "auto":
        resume = latest_complete_checkpoint(out)
        log(f"resuming from {resume}" if resume else "no complete checkpoint to resume from: starting fresh")
    trainer = make_trainer(model, targs, dataset, collator, margs.projector_lr, callbacks,
                           group_by_modality=dargs.group_by_modality_length, eval_dataset=validation)
    if trainer.is_world_process_zero():  # what this run is, before its first checkpoint: so it can be resumed
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out / RECIPE, recipe, indent=1)
    start = time.time()
    if os.environ.get("COURSE_LAUNCHED_AT"):  # set by run_zero2.sh: what a launch costs before its first step
        log(f"training starts {start - float(os.environ['COURSE_LAUNCHED_AT']):.1f} s after launch")
    with weights_only_loading():  # DeepSpeed's resume would unpickle in full: code could run
        result = trainer.train(resume_from_checkpoint=resume)
    peak = peak_memory_gib()  # loading and training, before a ZeRO-3 save gathers the weights on rank 0
    save_outputs(trainer, processor, margs, dargs, out)
    # Every rank says its own: ZeRO's stages differ in what each rank holds.
    print(f"[course_lib.train] rank {trainer.args.process_index}: peak memory "
          + ", ".join(f"{k} {v:.2f} GiB" for k, v in peak.items()), flush=True)
    losses = [(h["step"], h["loss"]) for h in trainer.state.log_history if "loss" in h]
    eval_losses = [(h["step"], h["eval_loss"]) for h in trainer.state.log_history if "eval_loss" in h]
    summary = {"stage": margs.stage, "train_type": margs.train_type if margs.stage == "finetune" else None,
               "steps": trainer.state.global_step, "epochs": trainer.state.epoch or 0.0, "samples": len(dataset),
               "skipped": dict(dataset.stats), "tokens": int(trainer.state.num_input_tokens_seen or 0),
               "seconds": time.time() - start, "dtype": str(dtype).removeprefix("torch."),
               "final_loss": losses[-1][1] if losses else result.training_loss,
               "train_loss": result.training_loss, "losses": losses, "eval_losses": eval_losses,
               "output_dir": str(out),
               "loss_curve": str(out / "loss_curve.png"), "param_table": param_table(model), "recipe": recipe,
               "peak_memory_gib": peak,
               "args": {**asdict(margs), **asdict(dargs)}}
    if trainer.is_world_process_zero():
        curves = {stage_name: losses, **({"validation": eval_losses} if eval_losses else {})}
        plot_loss_curves(curves, title=f"{stage_name} loss").savefig(out / "loss_curve.png", dpi=100)
        (out / SUMMARY).write_text(json.dumps(summary, indent=1))  # written last: marks a finished run
        log("\n" + format_summary(summary))
    return summary


@command
def main(argv: list[str] | None = None) -> int:
    run(sys.argv[1:] if argv is None else argv)
    return 0


def _shut_down_ranks() -> None:
    """Every rank done, then a clean shutdown: a rank that exits with its process group alive can die in the
    group's destructor ("terminate called without an active exception", exit code 250; seen once). Only for a
    launched rank: in-process callers (the tests) keep their process group."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    code = main()
    if code == 0:
        _shut_down_ranks()
    sys.exit(code)
