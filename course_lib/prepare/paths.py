"""Paths taken from datasets are untrusted: normalise them, confine them, and check what must exist.

A record's image path or a zip member's name is only used when it is relative, has no `..`, no
backslash and no NUL byte, so nothing a dataset says can write outside the output folder.
"""

from __future__ import annotations

import re
from pathlib import Path, PurePosixPath
from typing import Any

from course_lib.prepare.errors import InputError

# What a training image may be called; anything else in a record (a .txt, a .zip) is not placed.
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp"})


def safe_relpath(value: Any) -> str | None:
    """`value` as a normalised relative POSIX path, or None when it is not safe.

    Refused: non-strings, empty paths, absolute paths (`/x`, `C:x`), backslashes, NUL bytes and any
    `..` component. `./` components are dropped.
    """
    if not isinstance(value, str) or not value or "\x00" in value or "\\" in value:
        return None
    if value.startswith("/") or re.match(r"^[A-Za-z]:", value):
        return None
    parts = [part for part in PurePosixPath(value).parts if part != "."]
    if not parts or ".." in parts:
        return None
    return "/".join(parts)


def is_inside(root: Path, path: Path) -> bool:
    """True when `path` (after resolving symlinks in its parents) lies inside `root`."""
    try:
        path.parent.resolve().joinpath(path.name).relative_to(root.resolve())
    except ValueError:
        return False
    return True


def is_image_name(path: str) -> bool:
    """True when the file name ends in an image extension (case-insensitive)."""
    return PurePosixPath(path).suffix.lower() in IMAGE_EXTENSIONS


def identity(name: str) -> str | None:
    """Look an image up under the path the record gives."""
    return name


def basename(name: str) -> str | None:
    """Look an image up by its file name alone (sources whose folders differ from the records')."""
    return PurePosixPath(name).name


def require_file(path: Path, expected: str) -> Path:
    """`path`, or an InputError naming it and what it should have been."""
    if not path.is_file():
        raise InputError(f"missing input file {path}: expected {expected}")
    return path


def require_dir(path: Path, expected: str) -> Path:
    """`path`, or an InputError naming the folder and what it should have held."""
    if not path.is_dir():
        raise InputError(f"missing folder {path}: expected {expected}")
    return path
