"""Accuracy sweep for the tiny world: build a world, train stage 1 and stage 2 in-process, score each model.

Single process, no DeepSpeed, so it can run next to other work on a small CPU machine:

    COURSE_LIB_HOME=/tmp/acc_home python benchmarks/accuracy_sweep.py --out /tmp/acc/run1 \\
        --world '{"lm_steps": 600}' --seeds 0 1 --types use_lora freeze_vision none \\
        --stage2 "--num_train_epochs 3 --per_device_train_batch_size 16"

Prints one table per seed (eval.format_table) and the time of every stage; writes results.json in --out.
"""

from __future__ import annotations

import argparse
import json
import shlex
import time
from dataclasses import fields
from pathlib import Path

from course_lib import train
from course_lib.build import build_llava
from course_lib.eval import evaluate, format_table, load_items
from course_lib.serving.loading import load_trained
from course_lib.world import TinyWorldConfig, ensure_tiny_world
from course_lib.world.scenes import WorldSpec

LR = {"use_lora": "1e-3", "freeze_vision": "5e-4", "none": "2e-4"}


def world_config(overrides: dict) -> TinyWorldConfig:
    spec = WorldSpec(**overrides.pop("world", {}))
    names = {f.name for f in fields(TinyWorldConfig)}
    unknown = set(overrides) - names
    if unknown:
        raise SystemExit(f"--world: unknown TinyWorldConfig fields {sorted(unknown)}")
    return TinyWorldConfig(world=spec, **overrides)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--world", default="{}", help="TinyWorldConfig overrides as JSON")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--types", nargs="+", default=list(LR))
    parser.add_argument("--lr", default="{}", help="stage-2 LR per train type as JSON")
    parser.add_argument("--projector_lr", default="1e-3")
    # One string each, split like a shell line: --stage2 "--num_train_epochs 3 --per_device_train_batch_size 8"
    parser.add_argument("--stage1", type=shlex.split, default="--learning_rate 1e-3 --num_train_epochs 1",
                        help="extra train.py flags for stage 1, as one string")
    parser.add_argument("--stage2", type=shlex.split, default="--num_train_epochs 2",
                        help="extra train.py flags for stage 2, as one string")
    parser.add_argument("--eval_limit", type=int)
    args = parser.parse_args()
    lrs = {**LR, **json.loads(args.lr)}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}

    start = time.time()
    world = ensure_tiny_world(world_config(json.loads(args.world)))
    timings["world"] = time.time() - start
    print(f"world {world.root}: {timings['world']:.0f} s", flush=True)
    empty = out / "empty_llava"
    if not (empty / "config.json").is_file():
        build_llava(str(world.clip), str(world.llm), empty)
    items = load_items(world.data / "eval" / "eval.json", world.data / "eval" / "images", args.eval_limit)
    common = ["--per_device_train_batch_size", "32", "--logging_steps", "10", "--report_to", "none"]
    results = []
    for seed in args.seeds:
        runs = {}
        stage1 = out / f"s{seed}" / "pretrain"
        summary = train.run(["--stage", "pretrain", "--model_name_or_path", str(empty), "--data_path",
                             str(world.data / "pretrain"), "--output_dir", str(stage1), "--seed", str(seed),
                             *common, *args.stage1])
        timings[f"s{seed}/stage1"] = summary["seconds"]
        runs["stage 1 only"] = stage1
        for t in args.types:
            folder = out / f"s{seed}" / f"finetune_{t}"
            summary = train.run(["--stage", "finetune", "--train_type", t, "--model_name_or_path", str(stage1),
                                 "--data_path", str(world.data / "instruct" / "instruct.json"),
                                 "--image_folder", str(world.data / "instruct" / "images"),
                                 "--output_dir", str(folder), "--seed", str(seed), "--learning_rate", lrs[t],
                                 "--projector_lr", args.projector_lr, *common, *args.stage2])
            timings[f"s{seed}/{t}"] = summary["seconds"]
            runs[t] = folder
        reports = []
        for name, folder in runs.items():
            report = evaluate(load_trained(folder), items, batch_size=32, progress=False)
            report["model"] = name
            reports.append(report)
        print(f"\nseed {seed}\n{format_table(reports)}", flush=True)
        results.append({"seed": seed, "reports": [{k: r[k] for k in ("model", "accuracy", "by_type")}
                                                   for r in reports],
                        "wrong": {r["model"]: [p for p in r["predictions"] if not p["correct"]][:15]
                                  for r in reports}})
        (out / "results.json").write_text(json.dumps({"args": vars(args), "timings": timings,
                                                       "results": results}, indent=1))
    print("timings (s):", {k: round(v) for k, v in timings.items()}, flush=True)


if __name__ == "__main__":
    main()
