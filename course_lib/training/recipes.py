"""The run recipes, in one place: each stage's flags and each train type's learning rate.

Two recipes, both read by `course_lib.train` (defaults), `run_zero2.sh` (the tiny world end to end),
the notebooks and the tests:

* LLaVA-1.5's (haotian-liu/LLaVA, scripts/v1_5/pretrain.sh, finetune.sh and finetune_lora.sh): stage 1
  lr 1e-3; stage 2 lr 2e-5 in full, 2e-4 with LoRA. They are `course_lib.train`'s defaults, so a real
  run needs no learning-rate flag.
* The tiny world's: a global batch of 32 (16 per rank on run_zero2.sh's 2 CPU ranks), one epoch, the projector at
  1e-3 in stage 2, stage 2's samples packed without padding, and per-train-type learning rates tuned on the
  tiny world's held-out set (higher than LLaVA's: the models are small and trained from scratch, and one epoch
  is 188 steps).

    python -m course_lib.training.recipes finetune freeze_vision --model runs/tiny/pretrain --output_dir OUT --ranks 2
    -> the stage's flags, one per line (run_zero2.sh reads them with `mapfile`)
"""

from __future__ import annotations

import sys
from pathlib import Path

STAGES = ("pretrain", "finetune")

LLAVA_1_5_LR = {"pretrain": "1e-3", "use_lora": "2e-4", "partial_lora": "2e-4", "freeze_vision": "2e-5",
                "none": "2e-5"}
TINY_LR = {"pretrain": "1e-3", "use_lora": "1e-3", "partial_lora": "1e-3", "freeze_vision": "5e-4",
           "none": "2e-4"}
TINY_PROJECTOR_LR = "1e-3"
TINY_GLOBAL_BATCH = 32  # samples per optimizer step, whatever the number of ranks
CPU_RANKS = 2  # run_zero2.sh's default NUM_PROCS without CUDA


def trainer_defaults(stage: str, train_type: str) -> dict[str, str]:
    """`course_lib.train`'s defaults where they differ from the Trainer's; any flag given wins."""
    lr = LLAVA_1_5_LR["pretrain" if stage == "pretrain" else train_type]
    return {"learning_rate": lr, "per_device_train_batch_size": "16", "num_train_epochs": "1",
            "warmup_steps": "0.03", "lr_scheduler_type": "cosine", "weight_decay": "0.0", "logging_steps": "5",
            "save_strategy": "no", "report_to": "tensorboard", "remove_unused_columns": "false",
            "dataloader_num_workers": "0"}


def tiny_flags(stage: str, train_type: str | None = None, *, data: str | Path, model: str | Path,
               output_dir: str | Path, epochs: int = 1, ranks: int = CPU_RANKS) -> list[str]:
    """The tiny world's flags for one stage: `data` is the world's data folder ($TINY_DATA); `ranks` is the
    number of DeepSpeed ranks that share the global batch of 32 (run_zero2.sh's NUM_PROCS on CPU)."""
    data = Path(data)
    if ranks < 1 or TINY_GLOBAL_BATCH % ranks:
        raise ValueError(f"ranks {ranks}: the tiny recipe's batch of {TINY_GLOBAL_BATCH} must split evenly over them")
    batch = str(TINY_GLOBAL_BATCH // ranks)
    if stage == "pretrain":
        return ["--stage", "pretrain", "--model_name_or_path", str(model), "--data_path", str(data / "pretrain"),
                "--output_dir", str(output_dir), "--per_device_train_batch_size", batch,
                "--learning_rate", TINY_LR["pretrain"], "--num_train_epochs", str(epochs), "--logging_steps", "5"]
    if train_type not in TINY_LR or train_type == "pretrain":
        raise ValueError(f"train type {train_type!r}: expected one of use_lora, freeze_vision, none, partial_lora")
    return ["--stage", "finetune", "--train_type", train_type, "--model_name_or_path", str(model),
            "--data_path", str(data / "instruct" / "instruct.json"),
            "--image_folder", str(data / "instruct" / "images"),
            "--output_dir", str(output_dir), "--per_device_train_batch_size", batch,
            "--learning_rate", TINY_LR[train_type], "--projector_lr", TINY_PROJECTOR_LR,
            "--num_train_epochs", str(epochs), "--logging_steps", "5",
            # One flat row per batch with attention per sample (course_lib.model.packed_attention): the same loss
            # and gradients as padding (tests/test_speed.py), and 1.36x faster on 2 CPU cores, where a random
            # batch of 32 is 39% padding (benchmarks/RESULTS.md, issue 19, session 14).
            "--packing", "true"]


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m course_lib.training.recipes",
                                     description="print the tiny world's flags for one stage, one per line")
    parser.add_argument("stage", choices=STAGES)
    parser.add_argument("train_type", nargs="?")
    parser.add_argument("--model", required=True)
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--ranks", type=int, default=CPU_RANKS,
                        help=f"DeepSpeed ranks sharing the batch of 32 (default {CPU_RANKS})")
    parser.add_argument("--data", default=None, help="the tiny world's data folder (default: build or find it)")
    args = parser.parse_args(argv)
    if args.data is None:
        from course_lib.world import ensure_tiny_world

        args.data = ensure_tiny_world().data
    try:
        flags = tiny_flags(args.stage, args.train_type, data=args.data, model=args.model,
                           output_dir=args.output_dir, epochs=args.epochs, ranks=args.ranks)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print("\n".join(flags))
    return 0


if __name__ == "__main__":
    sys.exit(main())
