"""Parameter tables: how many weights each part of a LLaVA has, and how many of them train."""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from course_lib.util.tables import render_table

# LLaVA's parts, in forward order. Matching on the name works for plain and PEFT-wrapped models
# (`base_model.model.model.vision_tower...`) alike.
PARTS = ("vision_tower", "multi_modal_projector", "language_model", "lm_head")


def part_of(param_name: str) -> str:
    for part in PARTS:
        if f"{part}." in param_name or param_name.startswith(part):
            return part
    return "other"


def param_table(model: nn.Module) -> list[dict]:
    """One row per part: total, trainable and frozen parameter counts (shared tensors counted once)."""
    rows: OrderedDict[str, dict] = OrderedDict((p, {"module": p, "total": 0, "trainable": 0}) for p in PARTS)
    seen = set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            continue
        seen.add(id(p))
        row = rows.setdefault(part_of(name), {"module": part_of(name), "total": 0, "trainable": 0})
        n = getattr(p, "ds_numel", p.numel())  # ZeRO-3 leaves an empty tensor; ds_numel is the real size
        row["total"] += n
        row["trainable"] += n if p.requires_grad else 0
    out = [r for r in rows.values() if r["total"]]
    out.append({"module": "total", "total": sum(r["total"] for r in out),
                "trainable": sum(r["trainable"] for r in out)})
    for r in out:
        r["frozen"] = r["total"] - r["trainable"]
    return out


def _fmt(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e5 else f"{n:,}"


def format_table(rows: list[dict], markdown: bool = False) -> str:
    """Render `param_table` rows as aligned text, or as a Markdown table for notebooks."""
    cols = ["module", "total", "trainable", "frozen", "% trainable"]
    body = [[r["module"], _fmt(r["total"]), _fmt(r["trainable"]), _fmt(r["frozen"]),
             f"{100 * r['trainable'] / r['total']:.1f}%"] for r in rows]
    return render_table(cols, body, markdown)


def changed_parts(before: dict, after: dict) -> list[dict]:
    """Per part: how many tensors changed between two state dicts (same key names), and the largest change.

    Frozen parts must show 0 changed tensors: bit-identical, not merely close.
    """
    rows: OrderedDict[str, dict] = OrderedDict()
    for name, old in before.items():
        part = part_of(name)
        row = rows.setdefault(part, {"module": part, "tensors": 0, "changed": 0, "max_abs_change": 0.0})
        row["tensors"] += 1
        if not torch.equal(old, after[name]):
            row["changed"] += 1
            row["max_abs_change"] = max(row["max_abs_change"], (old.float() - after[name].float()).abs().max().item())
    return list(rows.values())


def side_by_side(tables: dict[str, list[dict]], column: str = "trainable") -> str:
    """A Markdown table with one column per run (e.g. train type) of `column` from `param_table` rows."""
    modules = [r["module"] for r in next(iter(tables.values()))]
    lines = ["| module | " + " | ".join(tables) + " |", "|---|" + "---|" * len(tables)]
    for m in modules:
        cells = [_fmt(next((r[column] for r in rows if r["module"] == m), 0)) for rows in tables.values()]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
