"""Seeing runs: loss curves, accuracy by question type and by objects per image, answers side by side."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from course_lib.data.records import IMAGE_TOKEN
from course_lib.training.checkpoints import SUMMARY, latest_complete_checkpoint

if TYPE_CHECKING:
    from collections.abc import Iterable, Sequence

    from matplotlib.figure import Figure

    from course_lib.eval import EvalItem


def loss_history(run_dir: str | Path) -> list[tuple[int, float]]:
    """(step, loss) pairs of a finished run (its summary) or of its latest complete checkpoint."""
    run_dir = Path(run_dir)
    if (run_dir / SUMMARY).is_file():
        return [tuple(x) for x in json.loads((run_dir / SUMMARY).read_text())["losses"]]
    ckpt = latest_complete_checkpoint(run_dir)
    if ckpt is None:
        return []
    history = json.loads((Path(ckpt) / "trainer_state.json").read_text())["log_history"]
    return [(h["step"], h["loss"]) for h in history if "loss" in h]


def plot_loss_curves(runs: dict[str, list[tuple[int, float]]], title: str = "training loss") -> Figure:
    """One line per run; returns the Figure."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for label, points in runs.items():
        if points:
            steps, losses = zip(*points)
            ax.plot(steps, losses, label=label, marker="." if len(points) < 30 else None)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if len(runs) > 1:
        ax.legend()
    fig.tight_layout()
    return fig


def _pyplot():
    import matplotlib

    if "inline" not in matplotlib.get_backend():
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def chance_by_type(items: Iterable[EvalItem]) -> dict[str, float]:
    """A uniform guess over the distinct reference answers of each question type: the floor to beat."""
    answers: dict[str, set[str]] = {}
    for item in items:
        answers.setdefault(item.type, set()).add(item.answer.lower())
    return {t: 1 / len(a) for t, a in sorted(answers.items())}


def plot_accuracy(reports: dict[str, dict], chance: dict[str, float] | None = None,
                  target: float | None = None) -> Figure:
    """Grouped bars: accuracy per question type (and overall), one bar per model; dashes mark chance."""
    import numpy as np

    plt = _pyplot()
    types = sorted({t for r in reports.values() for t in r["by_type"]}) + ["all"]
    x = np.arange(len(types))
    width = 0.8 / len(reports)
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(types)), 3.5))
    for k, (name, r) in enumerate(reports.items()):
        acc = [r["by_type"].get(t, {}).get("accuracy", 0) if t != "all" else r["accuracy"] for t in types]
        ax.bar(x + (k - (len(reports) - 1) / 2) * width, acc, width, label=name)
    for i, t in enumerate(types):
        if chance and t in chance:
            ax.hlines(chance[t], i - 0.4, i + 0.4, colors="k", linestyles="dashed", linewidth=1)
    if target is not None:
        ax.axhline(target, color="red", linewidth=0.8, label=f"target {target:.0%}")
    ax.set_xticks(x, types)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("exact-match accuracy")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    return fig


def plot_answers(items: Sequence[EvalItem], reports: dict[str, dict], k: int = 4) -> Figure:
    """The same images and questions answered by each model, side by side (first image of each item)."""
    from PIL import Image

    plt = _pyplot()
    fig, axes = plt.subplots(1, k, figsize=(3.2 * k, 3.6 + 0.25 * len(reports)), squeeze=False)
    for ax, item in zip(axes[0], items[:k]):
        ax.axis("off")
        if item.images:
            ax.imshow(Image.open(item.images[0]))
        lines = [item.messages[-1]["content"].replace(IMAGE_TOKEN, "").strip()[:40], f"reference: {item.answer}"]
        for name, r in reports.items():
            row = next(p for p in r["predictions"] if p["id"] == item.id)
            lines.append(f"{'✓' if row['correct'] else '✗'} {name}: {row['prediction'][:18]}")
        ax.set_title("\n".join(lines), fontsize=7, loc="left")
    fig.tight_layout()
    return fig


def accuracy_by_objects(report: dict, records: list[dict]) -> dict[str, dict[int, tuple[float, int]]]:
    """{question type: {objects in the scene: (accuracy, n)}} over the single-image questions of `report`,
    plus "all" pooling them. `records` are the eval records, whose `objects` field lists the objects in
    each image. A model that reads one object but cannot pick one out of several falls as n grows."""
    objects = {r["id"]: r["objects"][0] for r in records if len(r.get("objects", ())) == 1}
    groups: dict[str, dict[int, list[bool]]] = {}
    for row in report["predictions"]:
        if row["id"] in objects:
            for key in (row["type"], "all"):
                groups.setdefault(key, {}).setdefault(objects[row["id"]], []).append(row["correct"])
    return {t: {n: (sum(h) / len(h), len(h)) for n, h in sorted(g.items())} for t, g in sorted(groups.items())}


def plot_by_objects(reports: dict[str, dict], records: list[dict]) -> Figure:
    """One panel per model: accuracy of each single-image question type against the objects in the scene."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(reports), figsize=(3.2 * len(reports), 3), sharey=True, squeeze=False)
    for ax, (name, report) in zip(axes[0], reports.items()):
        for qtype, by_n in accuracy_by_objects(report, records).items():
            ns = list(by_n)
            ax.plot(ns, [by_n[n][0] for n in ns], marker="o", label=qtype,
                    linewidth=2.5 if qtype == "all" else 1, color="k" if qtype == "all" else None)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("objects in the image")
        ax.set_xticks(sorted({n for r in records for n in r.get("objects", ())}))
        ax.set_ylim(0, 1.05)
    axes[0][0].set_ylabel("exact-match accuracy")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    return fig


SCOREBOARD = "compare_train_types.json"  # notebook 06 writes it next to the models it scored


def pick_model(runs: str | Path) -> tuple[Path | None, str]:
    """(folder, why): the best model on notebook 06's scoreboard whose folder is still the run that was scored,
    else the newest finished run; (None, why) when there is none."""
    runs = Path(runs)
    board = runs / SCOREBOARD
    if board.is_file():
        scored = json.loads(board.read_text())
        fresh = {name: entry for name, entry in scored.items() if "folder" in entry
                 and (Path(entry["folder"]) / SUMMARY).is_file()
                 and (Path(entry["folder"]) / SUMMARY).stat().st_mtime <= board.stat().st_mtime}
        if fresh:  # a run retrained after the scoring is not what was scored: it is skipped
            name = max(fresh, key=lambda n: fresh[n]["accuracy"])
            return Path(fresh[name]["folder"]), (f"best on notebook 06's scoreboard: {name}, "
                                                 f"{fresh[name]['accuracy']:.1%} of the held-out questions")
    from course_lib.serving.loading import find_models

    finished = [folder for folder in find_models(runs) if (folder / SUMMARY).is_file()]
    if not finished:
        return None, f"no finished run under {runs}"
    newest = max(finished, key=lambda folder: (folder / SUMMARY).stat().st_mtime)
    return newest, "the newest finished run (notebook 06 has not scored the runs yet)"
