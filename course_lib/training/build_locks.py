"""Locks left behind by an interrupted op build, found and removed before DeepSpeed starts.

DeepSpeed builds some of its ops the first time a run needs them (on CPU, the shared-memory all-reduce:
about a minute). torch guards each build folder with a `lock` file (`torch.utils.file_baton.FileBaton`):
the builder creates it, keeps it open and deletes it when done; every other process waits while it exists.
A build killed half-way (Ctrl-C, an interrupted kernel, a timeout) leaves the file behind, and every later
run then waits on it forever, printing nothing. On Linux a lock file that no process has open is such a
leftover: the builder holds its file open from the moment it creates it until it deletes it. Only this
machine's processes can be asked, though: where several nodes share a home folder, a lock may belong to a build
on another node, so `run_zero2.sh` removes leftovers only when it runs on one node, and names them otherwise.
"""

from __future__ import annotations

import os
from pathlib import Path

PROC = Path("/proc")


def build_root() -> Path:
    """Where torch builds extensions: `$TORCH_EXTENSIONS_DIR`, else its per-user cache folder."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if root:
        return Path(root)
    from torch.utils.cpp_extension import get_default_build_root

    return Path(get_default_build_root())


def open_files() -> set[str]:
    """The paths of the files that this machine's processes (those we may look at) have open."""
    held = set()
    for fd in PROC.glob("[0-9]*/fd/*"):
        try:
            held.add(os.readlink(fd))
        except OSError:  # the process or the descriptor went away, or belongs to another user
            pass
    return held


def stale_build_locks(root: str | Path | None = None) -> list[Path]:
    """The build locks under `root` (torch's build folder) that no process of this machine has open. Empty
    where there is no /proc to ask (a lock is then left to torch, as before)."""
    if not (PROC / "self" / "fd").is_dir():
        return []
    root = Path(root) if root is not None else build_root()
    locks = [*root.glob("*/lock"), *root.glob("*/*/lock")]  # ROOT/NAME/lock and ROOT/py311_cpu/NAME/lock
    if not locks:
        return []
    held = open_files()
    return [lock for lock in locks if str(lock.resolve()) not in held]


def clear_stale_build_locks(one_node: bool) -> list[str]:
    """Remove the leftover locks (on one node) or only name them (several nodes); one line for each."""
    lines = []
    for lock in stale_build_locks():
        if one_node:
            lock.unlink(missing_ok=True)
            lines.append(f"removed {lock}: left by an op build that was interrupted (no process has it open); "
                         "the op is built again if needed")
        else:  # another node sharing this folder may be building: name it, do not touch it
            lines.append(f"{lock}: no process on this node has it open; unless a build is running on another node, "
                         "delete it, or the ranks will wait on it forever")
    return lines
