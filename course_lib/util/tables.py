"""One table renderer: aligned text for terminals, Markdown for notebooks and RESULTS.md."""

from __future__ import annotations

import html
from collections.abc import Sequence


def render_table(header: Sequence[str], body: Sequence[Sequence[str]], markdown: bool = False) -> str:
    """Rows of strings as aligned text columns, or as a Markdown table."""
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in body])
    widths = [max(len(c), *(len(row[i]) for row in body)) for i, c in enumerate(header)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(header, widths, strict=False)).rstrip()]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=False)).rstrip() for row in body]
    return "\n".join(lines)


def markdown_table(rows: list[dict]) -> str:
    """A Markdown table from rows of equal keys, for `IPython.display.Markdown`.

    Integers get thousands separators; `<` and `|` are escaped, so tokens such as `<|im_end|>` and
    `<image>` show as text instead of being read as HTML tags or cell borders.
    """
    def cell(v) -> str:
        text = f"{v:,}" if isinstance(v, int) and not isinstance(v, bool) else str(v)
        return html.escape(text, quote=False).replace("|", "\\|")

    cols = list(rows[0])
    return render_table([cell(c) for c in cols], [[cell(r[c]) for c in cols] for r in rows], markdown=True)
