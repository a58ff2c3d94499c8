"""Writing files so that a crash never leaves half of one: a temporary file beside it, then `os.replace`; and
the fingerprint of a model folder, which tells a retrained folder from the one a run started from."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write `text` to a temporary file next to `path`, fsync it, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: str | Path, data: Any, indent: int | None = None) -> None:
    """`data` as UTF-8 JSON (non-ASCII kept readable), written atomically."""
    atomic_write_text(path, json.dumps(data, ensure_ascii=False, indent=indent))


def check_writable(path: str | Path, flag: str, *, folder: bool = False) -> None:
    """Refuse, before any work, a path that cannot be written: one under a file, an existing folder where
    a file goes (or a file where a folder goes), or a parent folder without write permission."""
    from course_lib.util.cli import UserError

    path = Path(path).expanduser()
    if path.exists() and path.is_dir() != folder:
        raise UserError(f"{flag} {path}: is {'a file' if folder else 'a folder'}; expected "
                        f"{'a folder' if folder else 'a file path'}")
    parent = path if folder and path.exists() else path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise UserError(f"{flag} {path}: {parent} is a file, so nothing can be written under it")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {path}: no permission to write in {parent}")


def exclusive_lock(path: str | Path, flag: str):
    """An exclusive lock on `path` (filelock: flock on Unix), so parallel processes build a cache once; its
    folder is created, after a check that names `flag` if it cannot be written."""
    from filelock import FileLock

    path = Path(path)
    check_writable(path.parent, flag, folder=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(path)


def fingerprint(model: str | Path) -> str:
    """A folder's identity: its resolved path, its config.json and the size and mtime of each weight file (a
    retrained folder gets new ones); a hub id or the word `tiny` is itself."""
    folder = Path(model).expanduser()
    if not folder.is_dir():
        return str(model)
    digest = hashlib.sha256(str(folder.resolve()).encode())
    config = folder / "config.json"
    digest.update(config.read_bytes() if config.is_file() else b"")
    for path in sorted(folder.glob("*.safetensors")):
        stat = path.stat()
        digest.update(f"{path.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:16]
