"""The course's recap (notebook 11): what each notebook builds, and the numbers the learner's own runs produced.

Everything is read from disk at run time: the notebooks' banners, each run's `training_summary.json`
(written by `course_lib.train` when a run ends) and notebook 06's scoreboard `compare_train_types.json`.
Nothing here trains: a missing run is named with the notebook that makes it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from course_lib.i18n import BANNER_KEYS, cell_text
from course_lib.lessons.inspect_llava import COURSE
from course_lib.training.checkpoints import SUMMARY

# The runs under runs/tiny, each with the notebook that trains it.
RUNS = {"pretrain": "04_pretrain", "finetune_use_lora": "05_finetune", "finetune_freeze_vision": "05_finetune",
        "finetune_none": "05_finetune", "finetune_freeze_vision_11_epochs": "06_compare_train_types"}
SCOREBOARD = ("compare_train_types.json", "06_compare_train_types")
BANNER_LINE = re.compile(r"^> - \*\*(\w+)\*\*\s*(.*)$")
ENGLISH_KEY = {word: key for words in BANNER_KEYS.values() for key, word in words.items()}  # 需要 -> Needs, ...


def banner(notebook: str | Path) -> dict[str, str]:
    """The `> - **Needs** ...` lines of a notebook's first cell, as {"Needs": "...", "Builds": ..., ...}."""
    cells = json.loads(Path(notebook).read_text())["cells"]
    lines = cell_text(cells[0]).splitlines()
    return {ENGLISH_KEY.get(m.group(1), m.group(1)): m.group(2) for m in map(BANNER_LINE.match, lines) if m}


def course_recap(notebooks_dir: str | Path) -> list[dict]:
    """One row per notebook: what it teaches (the course map) and what it builds (its banner)."""
    rows = []
    for name, teaches, _ in COURSE:
        path = Path(notebooks_dir) / f"{name}.ipynb"
        builds = banner(path).get("Builds", "") if path.is_file() else "(not in this copy)"
        rows.append({"notebook": name, "teaches": teaches, "builds": builds})
    return rows


def run_summary(folder: Path) -> dict:
    """The numbers of one finished run, from its training summary."""
    s = json.loads((folder / SUMMARY).read_text())
    total = s["param_table"][-1]
    return {"run": folder.name, "stage": s["stage"], "train type": s.get("train_type") or "-", "steps": s["steps"],
            "epochs": s["epochs"], "samples": s["samples"], "tokens": s["tokens"], "seconds": round(s["seconds"], 1),
            "trainable": f"{total['trainable'] / total['total']:.2%}",
            "first loss": round(s["losses"][0][1], 4) if s.get("losses") else None,
            "final loss": round(s["final_loss"], 4)}


def runs_table(runs_dir: str | Path) -> tuple[list[dict], list[str]]:
    """(one row per finished run, one line per missing run naming the notebook that trains it)."""
    rows, missing = [], []
    for name, notebook in RUNS.items():
        folder = Path(runs_dir) / name
        if (folder / SUMMARY).is_file():
            rows.append(run_summary(folder))
        else:
            missing.append(f"{name}: not trained yet; run notebook {notebook}")
    return rows, missing


def scoreboard(runs_dir: str | Path) -> tuple[list[dict], str | None]:
    """(held-out accuracy in % per model, overall and per question type, or a line naming notebook 06 when it
    has not run)."""
    path = Path(runs_dir) / SCOREBOARD[0]
    if not path.is_file():
        return [], f"{SCOREBOARD[0]}: not written yet; run notebook {SCOREBOARD[1]}"
    board = json.loads(path.read_text())
    return [{"model": model, "overall": round(100 * r["accuracy"], 1),
             **{t: round(100 * v["accuracy"], 1) for t, v in sorted(r["by_type"].items())}}
            for model, r in board.items()], None
