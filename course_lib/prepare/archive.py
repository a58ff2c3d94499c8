"""Images inside a zip archive, extracted safely: no zip-slip, no symlinks, no decompression bombs.

An archive is untrusted input: a 300 kB `images.zip` once wrote a 300 MB "jpg". So:

- entries that are absolute, contain `..` or backslashes, or are symlinks are refused when the archive
  is opened (listed in `refused`) and can never be looked up or written;
- a member whose uncompressed size is over `MAX_MEMBER_BYTES` skips its record (`file_too_large`), and
  so does one of at least `RATIO_MIN_BYTES` that expands more than `MAX_RATIO` times (`suspicious_ratio`);
- the header's sizes are not trusted alone: extraction reads at most `MAX_MEMBER_BYTES + 1` bytes and
  checks both limits again on what it actually got; a member that does not decompress is `bad_zip_member`;
- once more than `max_total_bytes` (`--max_extract_gb`) would be extracted in one run, preparation stops
  with one error line.

Only members a kept record asks for are extracted, each to a temporary file renamed into place.
"""

from __future__ import annotations

import os
import stat
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path

from course_lib.prepare.errors import InputError, SkipRecord
from course_lib.prepare.paths import identity, safe_relpath

MAX_MEMBER_BYTES = 64 * 2**20  # no training image is near 64 MiB; read at call time so tests can lower it
MAX_RATIO = 100  # JPEG and PNG hardly compress further; 100x is a bomb, not a photo
RATIO_MIN_BYTES = 2**20  # below 1 MiB a high ratio is harmless (a flat little BMP) and is not judged
DEFAULT_MAX_EXTRACT_GB = 64.0
GIB = 2**30
CHUNK_BYTES = 2**20


class ZipImages:
    """Images inside a zip archive, looked up by `key(path)`; only asked-for members are written."""

    def __init__(self, path: Path, key: Callable[[str], str | None] = identity,
                 max_total_bytes: int = int(DEFAULT_MAX_EXTRACT_GB * GIB)):
        self.path, self.key, self.max_total_bytes = path, key, max_total_bytes
        self.refused: list[str] = []
        self.extracted = 0  # bytes written so far, over all members
        self._index: dict[str, zipfile.ZipInfo] = {}
        try:
            self._zip = zipfile.ZipFile(path)
        except (zipfile.BadZipFile, OSError) as err:
            raise InputError(f"cannot read zip archive {path}: {err}") from None
        for info in self._zip.infolist():
            if info.is_dir():
                continue
            name = safe_relpath(info.filename)
            if name is None or stat.S_ISLNK(info.external_attr >> 16):
                self.refused.append(info.filename)
                continue
            lookup = key(name)
            if lookup is not None:
                self._index.setdefault(lookup, info)

    def get(self, rel: str) -> Callable[[Path], None] | None:
        """A writer for the member behind `rel`, None when there is none; SkipRecord when it is too big."""
        lookup = self.key(rel)
        info = self._index.get(lookup) if lookup is not None else None
        if info is None:
            return None
        _check_sizes(info, info.file_size)
        return lambda dst: self._extract(info, dst)

    def _extract(self, info: zipfile.ZipInfo, dst: Path) -> None:
        """Stream one member to `dst` through a temporary file, stopping at the first limit it passes."""
        self._check_total(info.file_size)
        cap = MAX_MEMBER_BYTES
        tmp = dst.with_name(f".{dst.name}.tmp")
        written = 0
        try:
            with self._zip.open(info) as src, open(tmp, "wb") as out:
                while chunk := src.read(min(CHUNK_BYTES, cap + 1 - written)):
                    written += len(chunk)
                    _check_sizes(info, written)
                    self._check_total(written)
                    out.write(chunk)
            os.replace(tmp, dst)
        except (zipfile.BadZipFile, EOFError, zlib.error) as err:
            raise SkipRecord("bad_zip_member", f"zip member {info.filename!r} does not decompress ({err})") from None
        finally:
            tmp.unlink(missing_ok=True)
        self.extracted += written

    def _check_total(self, more: int) -> None:
        if self.extracted + more > self.max_total_bytes:
            raise InputError(f"extracting from {self.path} would pass {self.max_total_bytes} bytes "
                             f"({self.max_total_bytes / GIB:g} GiB, --max_extract_gb); {self.extracted} bytes are "
                             "extracted and no JSON was written: raise --max_extract_gb or lower --max_samples")


def _check_sizes(info: zipfile.ZipInfo, size: int) -> None:
    """Refuse a member of `size` uncompressed bytes (the header's, or what extraction has read so far)."""
    if size > MAX_MEMBER_BYTES:
        raise SkipRecord("file_too_large", f"zip member {info.filename!r} is over {MAX_MEMBER_BYTES} bytes "
                                           "uncompressed (MAX_MEMBER_BYTES)")
    if size >= RATIO_MIN_BYTES and size > MAX_RATIO * max(info.compress_size, 1):
        raise SkipRecord("suspicious_ratio", f"zip member {info.filename!r} expands {info.compress_size} -> "
                                             f"{size}+ bytes, over {MAX_RATIO}x (a decompression bomb?)")
