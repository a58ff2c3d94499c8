"""Where a dataset's images come from (a zip archive, a folder, or several) and how they reach the output.

An image source answers `get(path)` with a writer, a function that puts that image at a destination
path, or None when it does not have it. Folder images are copied, symlinked or hard-linked
(`--link_mode`); zip members are always extracted, within the limits in `archive`. Either way the file
appears under its final name only once complete (a temporary file, then `os.replace`).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from course_lib.prepare.archive import DEFAULT_MAX_EXTRACT_GB, GIB, ZipImages
from course_lib.prepare.errors import InputError
from course_lib.prepare.paths import identity, safe_relpath

LINK_MODES = ("copy", "symlink", "hardlink")

Writer = Callable[[Path], None]
Key = Callable[[str], str | None]


class ImageSource(Protocol):
    """Anything that can find a record's image: `get` a writer for it, and list refused entries."""

    refused: list[str]

    def get(self, rel: str) -> Writer | None: ...


@dataclass(frozen=True)
class Placement:
    """How images reach the output: folder images by `link_mode`, zip members within `max_extract_bytes`."""

    link_mode: str = "copy"
    max_extract_bytes: int = int(DEFAULT_MAX_EXTRACT_GB * GIB)


def _place_file(src: Path, dst: Path, link_mode: str) -> None:
    """Copy or link `src` to `dst` atomically; nothing to do when `dst` already is `src`."""
    if dst.exists() and os.path.samefile(src, dst):
        return  # already in place (output folder == input folder)
    tmp = dst.with_name(f".{dst.name}.tmp")
    tmp.unlink(missing_ok=True)
    if link_mode == "symlink":
        os.symlink(src.resolve(), tmp)
    elif link_mode == "hardlink":
        try:
            os.link(src, tmp)
        except OSError:  # another file system: fall back to a copy
            shutil.copyfile(src, tmp)
    else:
        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


class DirImages:
    """Images in a folder: `root / key(path)`, placed by `link_mode`."""

    def __init__(self, root: Path, key: Key = identity, link_mode: str = "copy"):
        self.root, self.key, self.link_mode = root, key, link_mode
        self.refused: list[str] = []

    def get(self, rel: str) -> Writer | None:
        """A writer placing `root / key(rel)`, None when that is not a safe path to an existing file."""
        lookup = self.key(rel)
        lookup = safe_relpath(lookup) if lookup is not None else None
        if lookup is None:
            return None
        src = self.root / lookup
        if not src.is_file():
            return None
        return lambda dst: _place_file(src, dst, self.link_mode)


class ChainImages:
    """Several sources tried in order (COCO first, then a folder for the rest of a mixture)."""

    def __init__(self, sources: list[ImageSource]):
        self.sources = sources
        self.refused = [entry for source in sources for entry in source.refused]

    def get(self, rel: str) -> Writer | None:
        """The first source's writer for `rel`."""
        for source in self.sources:
            writer = source.get(rel)
            if writer is not None:
                return writer
        return None


def open_images(zip_path: Path | None, dir_path: Path | None, expected: str, placement: Placement,
                zip_key: Key = identity, dir_key: Key = identity) -> ImageSource:
    """The zip archive when it exists, else the extracted folder, else one error line naming what is missing."""
    if zip_path is not None and zip_path.is_file():
        return ZipImages(zip_path, zip_key, placement.max_extract_bytes)
    if dir_path is not None and dir_path.is_dir():
        return DirImages(dir_path, dir_key, placement.link_mode)
    raise InputError(f"missing input file {zip_path or dir_path}: expected {expected}")
