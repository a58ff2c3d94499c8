"""ZeRO-2 against ZeRO-3, measured: the peak memory of each rank for the same stage-2 step at real widths.

    python -m benchmarks.zero_memory            # CLIP-L/336 + Qwen2.5-0.5B widths, 2 CPU ranks: about 5 min
    python -m benchmarks.zero_memory --configs zero2 zero3 zero3_offload

The model is the full-size real-shaped LLaVA (`clip-l-336-random` + `qwen2.5-0.5b-random`: the real configs,
tokenizer and 576 image tokens, random weights; about 0.9B parameters), built once in fp32. Each config trains
the same `freeze_vision` stage 2 for `--steps` steps of one sample per rank through `run_zero2.sh`, and every
rank prints its memory (`course_lib.training.zero.peak_memory_gib`): its private (anonymous) memory when
training ends, which holds its weights, gradients and optimizer states, and its peak resident memory, the OS's
high-water mark (loading included, and the pages of the memory-mapped checkpoint, which ranks share). On a GPU
the same line also gives the peak CUDA memory. The table sets the measured private memory beside what
partitioning the fp32 weights alone should save: ZeRO-3 keeps 1/N of every weight on each rank,
frozen ones included, so each rank should hold about (1 - 1/N) x 4 bytes x parameters less.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PEAK = re.compile(r"rank (\d+): peak memory resident ([0-9.]+) GiB, private ([0-9.]+) GiB")


def read_peaks(log: Path) -> dict[int, tuple[float, float]]:
    """rank -> (peak resident, private) GiB, from the line every `course_lib.train` rank prints."""
    return {int(rank): (float(peak), float(private)) for rank, peak, private in PEAK.findall(log.read_text())}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.zero_memory", description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "out" / "zero_memory"))
    parser.add_argument("--configs", nargs="+", default=["zero2", "zero3", "zero3_tight"],
                        choices=["zero2", "zero3", "zero3_offload", "zero3_tight"],
                        help="zero3_tight: configs/zero3.json with stage3_max_live_parameters 1e7, "
                             "stage3_max_reuse_distance 0 and stage3_prefetch_bucket_size 5e6")
    parser.add_argument("--fresh", action="store_true", help="run a config again even if its log is complete")
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--steps", type=int, default=2)
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    from safetensors.torch import save_file

    from course_lib.build import build_llava
    from course_lib.model.layout import INDEX
    from course_lib.model.lora import PROJECTOR
    from course_lib.training.arguments import PROJECTOR_FILE
    from course_lib.world import ensure_tiny_world
    from course_lib.world.real_shaped import FULL_LLM_NAME, FULL_VISION_NAME

    model = out / "llava_0.5b_random"
    if not (model / PROJECTOR_FILE).is_file():  # written last: a complete folder
        llava, _ = build_llava(FULL_VISION_NAME, FULL_LLM_NAME, model, dtype="float32")
        # Stage 2 starts from a stage-1 projector (run_zero2.sh checks); the empty one stands in, saved as
        # course_lib.training.checkpoints saves a trained one.
        projector = {k: v.contiguous() for k, v in llava.model.multi_modal_projector.state_dict().items()}
        save_file(projector, str(model / PROJECTOR_FILE), metadata={"format": "pt", "module": PROJECTOR})
    params = json.loads((model / INDEX).read_text())["metadata"]["total_size"] // 4  # fp32: 4 bytes each
    world = ensure_tiny_world()
    records = json.loads((world.data / "instruct" / "instruct.json").read_text())
    data = out / "data.json"
    data.write_text(json.dumps([r for r in records if "image" in r][: 8 * args.ranks * args.steps]))

    env = {**os.environ, "NUM_PROCS": str(args.ranks),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    tight = json.loads((REPO / "configs" / "zero3.json").read_text())
    # LLaVA's zero3.json keeps up to 1e9 gathered parameters live and reuses them within 1e9 parameters: a
    # model smaller than that stays gathered whole on every rank after its first forward pass.
    tight["zero_optimization"].update(stage3_max_live_parameters=1e7, stage3_max_reuse_distance=0,
                                      stage3_prefetch_bucket_size=5e6)
    (out / "zero3_tight.json").write_text(json.dumps(tight, indent=1))
    rows = []
    for config in args.configs:
        log = out / f"{config}.log"
        path = out / "zero3_tight.json" if config == "zero3_tight" else REPO / "configs" / f"{config}.json"
        done = read_peaks(log) if log.is_file() else {}
        if len(done) == args.ranks and not args.fresh:
            print(f"{config}: reusing {log}", flush=True)
            rows.append((config, done))
            continue
        cmd = ["bash", str(REPO / "run_zero2.sh"), "--stage", "finetune", "--train_type", "freeze_vision",
               "--model_name_or_path", str(model), "--data_path", str(data),
               "--image_folder", str(world.data / "instruct" / "images"), "--output_dir", str(out / config),
               "--deepspeed", str(path), "--per_device_train_batch_size", "1",
               "--max_steps", str(args.steps), "--logging_steps", "1", "--report_to", "none",
               "--learning_rate", "1e-5"]
        print("$", " ".join(cmd[1:]), flush=True)
        with open(log, "w") as f:
            run = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
        peaks = read_peaks(log)
        if run.returncode or len(peaks) != args.ranks:
            # Recorded, not fatal: a rank the OS killed for memory (exit 247, SIGKILL) is itself the answer.
            print(f"{config} failed (exit {run.returncode}); see {log}", file=sys.stderr)
            rows.append((config, f"failed, exit {run.returncode}" + (" (killed: out of memory?)"
                                                                      if run.returncode in (137, 247) else "")))
            continue
        rows.append((config, peaks))
    lines = [f"{params / 1e9:.2f}B parameters (fp32), {args.ranks} ranks, freeze_vision, batch 1 per rank, "
             f"{args.steps} steps",
             "", "| config | " + " | ".join(f"rank {r}: private after training, GiB | rank {r}: peak resident, GiB"
                                          for r in range(args.ranks)) + " |",
             "|---|" + "---|---|" * args.ranks]
    lines += [f"| {c} | " + (" | ".join(f"{p[r][1]:.2f} | {p[r][0]:.2f}" for r in range(args.ranks))
                             if isinstance(p, dict) else p + " |" * (2 * args.ranks - 1)) + " |" for c, p in rows]
    if len(rows) >= 2 and rows[0][0] == "zero2" and isinstance(rows[0][1], dict):
        base = sum(p[1] for p in rows[0][1].values()) / args.ranks
        for config, peaks in rows[1:]:
            if not isinstance(peaks, dict):
                continue
            mean = sum(p[1] for p in peaks.values()) / args.ranks
            lines.append(f"\n{config} against zero2: {base - mean:.2f} GiB less private memory per rank; "
                         f"partitioning the fp32 weights alone: {(1 - 1 / args.ranks) * 4 * params / 2 ** 30:.2f} GiB")
    text = "\n".join(lines)
    (out / "summary.md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
