"""The "What we saw" cells: each claim of a notebook's summary, checked on that run's own objects."""

from __future__ import annotations


def confirm(checks: dict[str, bool]) -> None:
    """Print `ok` or `FAIL` before each claim; raise naming every claim that does not hold."""
    for claim, ok in checks.items():
        print("ok  " if ok else "FAIL", claim)
    failed = [claim for claim, ok in checks.items() if not ok]
    if failed:
        raise AssertionError("not so in this run: " + "; ".join(failed))
