"""Figures for the notebooks (matplotlib). Each function returns its Figure so tests can save it."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use(matplotlib.get_backend() if "inline" in matplotlib.get_backend() else "Agg")
import matplotlib.pyplot as plt  # noqa: E402
from PIL import Image  # noqa: E402


def _first_image(record: dict) -> str | None:
    image = record.get("image")
    return image[0] if isinstance(image, list) else image


def show_samples(json_path: str | Path, image_dir: str | Path, n: int = 8, cols: int = 4):
    """A grid of the first `n` image samples of a LLaVA-format file, each titled with its first answer."""
    records = [r for r in json.loads(Path(json_path).read_text()) if _first_image(r)][:n]
    rows = (len(records) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 3.2 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, rec in zip(axes.flat, records, strict=False):
        ax.imshow(Image.open(Path(image_dir) / _first_image(rec)))
        q = rec["conversations"][0]["value"].replace("<image>", "").strip()
        a = rec["conversations"][1]["value"]
        ax.set_title(f"{q[:38]}\n→ {a[:38]}", fontsize=8)
    fig.tight_layout()
    return fig
