"""Seeing training: loss curves, the one-screen summary, and finding complete checkpoints."""

from __future__ import annotations

import json
import re
from pathlib import Path

SUMMARY = "training_summary.json"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


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


def plot_loss_curves(runs: dict[str, list[tuple[int, float]]], title: str = "training loss"):
    """One line per run; returns the Figure."""
    import matplotlib

    if "inline" not in matplotlib.get_backend():
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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


def latest_complete_checkpoint(output_dir: str | Path) -> str | None:
    """The newest `checkpoint-N` whose trainer_state.json exists. The Trainer writes that file last,
    so a checkpoint without it was cut off mid-write and must not be resumed from."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return None
    found = [(int(m.group(1)), p) for p in output_dir.iterdir()
             if (m := _CHECKPOINT.match(p.name)) and (p / "trainer_state.json").is_file()]
    return str(max(found)[1]) if found else None


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
