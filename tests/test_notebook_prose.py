"""Numbers in the notebooks' prose come from a run: printed by a cell, or recorded with the command that made them.

A measured-looking quantity in a Markdown cell (a percentage, a duration, a memory size, a speed-up) must be
- in the banner's Needs / Builds / Takes lines (the times measured in `make test`), or
- in a cell that names its recorded source (`benchmarks/RESULTS.md`, `benchmarks/recorded/`, a
  `benchmarks/gpu_*` summary), and then found verbatim in that source, or
- a specification, not a measurement (a recipe's warm-up share, a size limit, an arithmetic product), listed
  below with the reason.
Anything else is a number a learner cannot trace: print it from a cell instead.
"""

import json
import re
from pathlib import Path

import pytest

from course_lib.i18n import cell_text, english_notebooks

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = english_notebooks()  # the language editions carry the same numbers: tests/test_i18n.py
QUANTITY = re.compile(r"(?<![\w.+-])(\d[\d,]*(?:\.\d+)?)\s?(%|x(?=[\s,.;:)])|×|s(?=[\s,.;:)])|min\b|minutes?\b|"
                      r"seconds?\b|hours?\b|days?\b|GiB\b|MiB\b|GB\b|TFLOP/s)")
BANNER = ("**Needs**", "**Builds**", "**Takes**")
SOURCES = {"RESULTS.md": REPO / "benchmarks" / "RESULTS.md"}
SOURCES.update({f"gpu_{p.parent.name[4:]}": p for p in (REPO / "benchmarks").glob("gpu_*/summary*.md")})
SOURCES.update({f"recorded/{p.name}": p for p in (REPO / "benchmarks" / "recorded").glob("*.json")})
# (notebook file prefix, quantity as written): why it is not a measurement.
SPECIFICATIONS = {
    ("00", "2×"): "the scene's 2x2 grid",
    ("01", "24 ×"): "(336 / 14)² = 24 x 24, arithmetic",
    ("04", "3%"): "LLaVA-1.5's warm-up ratio 0.03, a recipe value",
    ("06", "90%"): "the course's accuracy target (issue 5), a goal, not a result",
    ("07", "20 MiB"): "the upload limit, course_lib.serving.widgets",
    ("07", "1.8 GB"): "0.9B parameters x 2 bytes (bf16), arithmetic",
    ("07", "3.6 GB"): "0.9B parameters x 4 bytes (fp32), arithmetic",
    ("07", "27 x"): "729 = 27 x 27 SigLIP patches, arithmetic",
    ("08", "151,936 ×"): "Qwen2.5's vocabulary x width, from its config",
    ("09", "4x"): "pixel shuffle's 2x2 blocks: 4x fewer tokens, by construction",
    ("09", "2×"): "2x2 blocks",
    ("09", "13 x"): "12 tiles + a thumbnail, arithmetic",
    ("10", "80 GiB"): "an H100/A100's memory, a hardware specification",
    ("08", "80 GB"): "an H100/A100's memory, a hardware specification",
}


def untraceable(path: Path) -> list[str]:
    bad = []
    for cell in json.loads(path.read_text())["cells"]:
        if cell["cell_type"] != "markdown":
            continue
        text = cell_text(cell)
        cited = [src for name, src in SOURCES.items() if name in text or f"benchmarks/{name}" in text]
        for line in text.splitlines():
            if any(mark in line for mark in BANNER):
                continue
            for match in QUANTITY.finditer(line):
                quantity, number = match.group(0), match.group(1)
                if (path.name[:2], quantity) in SPECIFICATIONS:
                    continue
                if any(number in src.read_text() for src in cited):
                    continue
                bad.append(f"{path.name} cell {cell.get('id')}: {quantity!r} in {line.strip()[:90]!r}")
    return bad


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: str(p.relative_to(REPO / "notebooks")))
def test_every_number_in_the_prose_is_printed_or_recorded(path):
    bad = untraceable(path)
    assert not bad, "numbers a learner cannot trace (print them, or cite the recorded run):\n" + "\n".join(bad)


def test_the_check_catches_a_number_that_is_neither_printed_nor_recorded(tmp_path):
    notebook = {"cells": [{"cell_type": "markdown", "id": "a", "source": ["The run reached 91.3% in 12 min.\n"]},
                          {"cell_type": "markdown", "id": "b", "source": ["> - **Takes** about 12 min\n"]}],
                "metadata": {}, "nbformat": 4, "nbformat_minor": 5}
    path = tmp_path / "99_probe.ipynb"
    path.write_text(json.dumps(notebook))
    assert [line.split(": ", 1)[1].split(" in ")[0] for line in untraceable(path)] == ["'91.3%'", "'12 min'"]
