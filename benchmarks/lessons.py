"""Claims from the course's sources, measured on the tiny world; notebooks 06 and 09 show the recorded results.

    python -m benchmarks.lessons                                # all four, about 20 min on 2 cores
    python -m benchmarks.lessons --only feature_layer --steps 300

- `feature_layer`: CLIP layer -1, -2 (LLaVA-1.5) and -4 (InternVL's choice; in the tiny 3-block CLIP that is
  the patch embeddings before any transformer block), freeze_vision from the empty LLaVA.
- `untrained_projector`: source 001's accident, use_lora from the empty LLaVA with the projector trained,
  or left at its random initialisation; scored with the images and blind (black images).
- `hallucination`: questions about absent objects, asked of notebook 06's 11-epoch model, then after a short
  finetune (half the steps) from it with 1,500 image-text mismatch negatives added to the training data (source
  000's remedy), against the same finetune with 1,500 ordinary questions added.
- `overfitting`: 64 training samples seen many times (4/3 of the steps), the validation loss every 25 steps.

Every run is `course_lib.lessons.ablations.ablation_run` (one process, no Trainer, no DeepSpeed: variants are
compared with each other, not with the course's runs). Results go to `benchmarks/recorded/lessons.json`, which
the notebooks read, with this command and the date.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import shlex
import sys
import tempfile
from pathlib import Path

from course_lib.lessons.ablations import ablation_run
from course_lib.training.launch import runs_dir
from course_lib.world.backbones import ensure_tiny_world
from course_lib.world.scenes import write_question_set

RECORDED = Path(__file__).parent / "recorded" / "lessons.json"
EXPERIMENTS = ("feature_layer", "untrained_projector", "hallucination", "overfitting")


def experiment(name: str, world, steps: int, tmp: Path) -> list[dict]:
    if name == "feature_layer":
        return [ablation_run(world, f"layer {k}", feature_layer=k, steps=steps) for k in (-1, -2, -4)]
    if name == "untrained_projector":
        return [ablation_run(world, label, train_type="use_lora", lr=1e-3, freeze_projector=frozen, steps=steps)
                for label, frozen in (("projector trained", False), ("projector never trained", True))]
    if name == "hallucination":  # a good model, then a short finetune with or without mismatch negatives
        start = runs_dir() / "finetune_freeze_vision_11_epochs"
        if not (start / "training_summary.json").is_file():
            raise SystemExit(f"{start}: not found; run notebook 06 first (its 11-epoch model is the starting point)")
        probes = {"absent": write_question_set(tmp / "probe", 300, seed=20261205, absent=True)}
        extra = {"ordinary questions added": write_question_set(tmp / "present", 1500, seed=7, absent=False),
                 "mismatch negatives added": write_question_set(tmp / "absent", 1500, seed=8, absent=True)}
        before = ablation_run(world, "notebook 06's 11-epoch model", start=start, steps=0, probes=probes, blind=False)
        return [before, *(ablation_run(world, label, start=start, extra=path, probes=probes, steps=steps // 2,
                                       blind=False) for label, path in extra.items())]
    if name == "overfitting":
        return [ablation_run(world, "64 training samples", train_limit=64, validate_every=25, steps=steps * 4 // 3,
                             blind=False)]
    raise ValueError(name)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.lessons", description=__doc__.split("\n")[0])
    parser.add_argument("--only", nargs="*", choices=EXPERIMENTS, default=list(EXPERIMENTS))
    parser.add_argument("--steps", type=int, default=300, help="batches of 16 per run")
    parser.add_argument("--out", type=Path, default=RECORDED)
    args = parser.parse_args(argv)
    world = ensure_tiny_world()
    recorded = json.loads(args.out.read_text()) if args.out.exists() else {}
    command = "python -m benchmarks.lessons " + shlex.join(sys.argv[1:] if argv is None else argv)
    for name in args.only:
        with tempfile.TemporaryDirectory() as tmp:
            runs = experiment(name, world, args.steps, Path(tmp))
        recorded[name] = {"command": command.strip(), "date": datetime.date.today().isoformat(),
                          "machine": f"{platform.machine()}, {platform.python_version()}", "world": world.root.name,
                          "runs": runs}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(recorded, indent=1) + "\n")  # after each experiment: nothing lost
        for r in runs:
            extra = {k: r[k]["accuracy"] for k in ("absent",) if k in r}
            print(f"{name}: {r['label']}: accuracy {r['accuracy']:.1%}, blind {r.get('blind', float('nan')):.1%}, "
                  f"{extra}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
