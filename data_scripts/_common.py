"""Shared helpers for the ``prepare_*.py`` dataset scripts.

Every script turns one public dataset into the course's LLaVA format: a JSON list written to
``<output_dir>/<name>.json`` whose records look like::

    {"id": "...", "image": "relative/path.jpg",            # or a list, or absent for text-only
     "conversations": [{"from": "human", "value": "<image>\\n..."}, {"from": "gpt", "value": "..."}]}

with the images placed under an image folder inside ``output_dir``. The helpers here do the parts
that are the same for all datasets: argument parsing, downloading (or reading ``--from-dir``),
reading JSON / JSON Lines, checking image paths (never absolute, never ``..``), checking that there
is exactly one ``<image>`` placeholder per image in the human turns, pulling images out of a zip
archive (refusing zip-slip and symlink entries) or a folder, writing the result atomically and
printing a summary.

Scripts import this module as ``_common``; they are meant to be run as files
(``python data_scripts/prepare_x.py``), which puts this folder on ``sys.path``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import stat
import sys
import tempfile
import zipfile
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

IMAGE_TOKEN = "<image>"
ROLES = ("human", "gpt")
LINK_MODES = ("copy", "symlink", "hardlink")

# A "writer" puts one image at the destination path it is given.
Writer = Callable[[Path], None]


class InputError(Exception):
    """A problem with what the user passed in; reported as one line on stderr, exit code 2."""


class SkipRecord(Exception):
    """Raised while converting one record; the message is the reason that gets counted."""


# --------------------------------------------------------------------------- paths and files


def safe_relpath(value: Any) -> str | None:
    """Return ``value`` as a normalised relative POSIX path, or None when it is not safe.

    Refused: non-strings, empty paths, absolute paths (``/x``, ``C:x``), backslashes, NUL bytes
    and any ``..`` component. ``./`` components are dropped.
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
    """True when ``path`` (after resolving symlinks in its parents) lies inside ``root``."""
    try:
        path.parent.resolve().joinpath(path.name).relative_to(root.resolve())
    except ValueError:
        return False
    return True


def require_file(path: Path, expected: str) -> Path:
    if not path.is_file():
        raise InputError(f"missing input file {path}: expected {expected}")
    return path


def require_dir(path: Path, expected: str) -> Path:
    if not path.is_dir():
        raise InputError(f"missing folder {path}: expected {expected}")
    return path


def read_records(path: Path) -> list:
    """Read a JSON list (``[...]``) or a JSON Lines file (one object per line): course_lib's reader."""
    from course_lib.records import DataError
    from course_lib.records import read_records as read

    try:
        return read(path)
    except DataError as err:
        raise InputError(err.message) from None


def atomic_write_json(path: Path, data: Any) -> None:
    """Write ``data`` as JSON to a temporary file next to ``path``, then ``os.replace`` it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(data, handle, ensure_ascii=False)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _place_file(src: Path, dst: Path, link_mode: str) -> None:
    if dst.exists() and os.path.samefile(src, dst):
        return  # already in place (output folder == input folder)
    tmp = dst.with_name(f".{dst.name}.tmp")
    tmp.unlink(missing_ok=True)
    if link_mode == "symlink":
        os.symlink(src.resolve(), tmp)
    elif link_mode == "hardlink":
        try:
            os.link(src, tmp)
        except OSError:  # other file system: fall back to a copy
            shutil.copyfile(src, tmp)
    else:
        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


# --------------------------------------------------------------------------- image sources


def identity(name: str) -> str | None:
    return name


def basename(name: str) -> str | None:
    return PurePosixPath(name).name


class ZipImages:
    """Images inside a zip archive, looked up by ``key(path)``; only asked-for members are written.

    Entries whose names are absolute, contain ``..``, use backslashes, or are symlinks are refused
    (zip-slip protection) and listed in ``refused``; they can never be looked up or written.
    """

    def __init__(self, path: Path, key: Callable[[str], str | None] = identity):
        self.key = key
        self.refused: list[str] = []
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

    def get(self, rel: str) -> Writer | None:
        lookup = self.key(rel)
        info = self._index.get(lookup) if lookup is not None else None
        if info is None:
            return None

        def write(dst: Path) -> None:
            tmp = dst.with_name(f".{dst.name}.tmp")
            with self._zip.open(info) as src, open(tmp, "wb") as out:
                shutil.copyfileobj(src, out)
            os.replace(tmp, dst)

        return write


class DirImages:
    """Images in a folder: ``root / key(path)``; copied, symlinked or hard-linked on export."""

    def __init__(self, root: Path, key: Callable[[str], str | None] = identity, link_mode: str = "copy"):
        self.root, self.key, self.link_mode = root, key, link_mode
        self.refused: list[str] = []

    def get(self, rel: str) -> Writer | None:
        lookup = self.key(rel)
        lookup = safe_relpath(lookup) if lookup is not None else None
        if lookup is None:
            return None
        src = self.root / lookup
        if not src.is_file():
            return None
        return lambda dst: _place_file(src, dst, self.link_mode)


class ChainImages:
    """Try several sources in order."""

    def __init__(self, sources: list):
        self.sources = sources
        self.refused = [entry for source in sources for entry in source.refused]

    def get(self, rel: str) -> Writer | None:
        for source in self.sources:
            writer = source.get(rel)
            if writer is not None:
                return writer
        return None


def open_images(
    zip_path: Path | None,
    dir_path: Path | None,
    expected: str,
    zip_key: Callable[[str], str | None] = identity,
    dir_key: Callable[[str], str | None] = identity,
    link_mode: str = "copy",
):
    """Use the zip archive when it exists, else the extracted folder, else fail with one line."""
    if zip_path is not None and zip_path.is_file():
        return ZipImages(zip_path, zip_key)
    if dir_path is not None and dir_path.is_dir():
        return DirImages(dir_path, dir_key, link_mode)
    raise InputError(f"missing input file {zip_path or dir_path}: expected {expected}")


# --------------------------------------------------------------------------- records


@dataclass
class Prepared:
    """One source record, mapped to the course format but not yet checked.

    ``images`` holds ``(where to find it in the source, where to put it under the image folder)``.
    """

    id: str
    conversations: Any
    images: list = field(default_factory=list)


def image_list(value: Any) -> list:
    """The ``image`` field of a LLaVA record as a list (absent or null means text-only)."""
    if value is None:
        return []
    return list(value) if isinstance(value, list) else [value]


def from_llava_record(index: int, raw: dict, id_prefix: str) -> Prepared:
    """A record that is already LLaVA-shaped (``id``/``image``/``conversations``)."""
    rec_id = raw.get("id")
    if rec_id is None or rec_id == "":
        rec_id = f"{id_prefix}_{index:06d}"
    images = [(path, path) for path in image_list(raw.get("image"))]
    return Prepared(id=str(rec_id), conversations=raw.get("conversations"), images=images)


def check_conversations(conversations: Any, n_images: int) -> list:
    """Validate the turns and the placeholders; return clean ``{"from", "value"}`` turns.

    A single-image record without any ``<image>`` gets one prepended to its first human turn;
    any other count that differs from the number of images (or ``<image>`` in a gpt turn) is
    a ``placeholder_mismatch``.
    """
    if not isinstance(conversations, list) or not conversations:
        raise SkipRecord("bad_conversation")
    turns = []
    for turn in conversations:
        if (
            not isinstance(turn, dict)
            or turn.get("from") not in ROLES
            or not isinstance(turn.get("value"), str)
        ):
            raise SkipRecord("bad_conversation")
        turns.append({"from": turn["from"], "value": turn["value"]})
    if turns[0]["from"] != "human" or not any(turn["from"] == "gpt" for turn in turns):
        raise SkipRecord("bad_conversation")
    if any(IMAGE_TOKEN in turn["value"] for turn in turns if turn["from"] == "gpt"):
        raise SkipRecord("placeholder_mismatch")
    count = sum(turn["value"].count(IMAGE_TOKEN) for turn in turns)
    if count == 0 and n_images == 1:
        turns[0]["value"] = f"{IMAGE_TOKEN}\n{turns[0]['value']}"
    elif count != n_images:
        raise SkipRecord("placeholder_mismatch")
    return turns


@dataclass
class Result:
    records: list = field(default_factory=list)
    skipped: Counter = field(default_factory=Counter)


def convert(
    raw_records: Iterable,
    adapt: Callable[[int, dict], Prepared],
    images,
    image_dir: Path,
    max_samples: int | None = None,
) -> Result:
    """Map, check and export records until ``max_samples`` of them have been written."""
    result = Result()
    placed: set = set()
    for index, raw in enumerate(raw_records):
        if max_samples is not None and len(result.records) >= max_samples:
            break
        try:
            if not isinstance(raw, dict):
                raise SkipRecord("bad_record")
            record = _finish(adapt(index, raw), images, image_dir, placed)
        except SkipRecord as skip:
            result.skipped[str(skip)] += 1
            continue
        result.records.append(record)
    return result


def _finish(item: Prepared, images, image_dir: Path, placed: set) -> dict:
    pairs = []
    for src, dst in item.images:
        src_rel, dst_rel = safe_relpath(src), safe_relpath(dst)
        if src_rel is None or dst_rel is None or not is_inside(image_dir, image_dir / dst_rel):
            raise SkipRecord("unsafe_image_path")
        pairs.append((src_rel, dst_rel))
    turns = check_conversations(item.conversations, len(pairs))
    writers = []
    for src_rel, dst_rel in pairs:
        writer = images.get(src_rel) if images is not None else None
        if writer is None:
            raise SkipRecord("missing_image")
        writers.append((writer, dst_rel))
    for writer, dst_rel in writers:
        if dst_rel not in placed:
            dst = image_dir / dst_rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            writer(dst)
            placed.add(dst_rel)
    record: dict = {"id": item.id}
    if pairs:
        outputs = [dst_rel for _, dst_rel in pairs]
        record["image"] = outputs[0] if len(outputs) == 1 else outputs
    record["conversations"] = turns
    return record


# --------------------------------------------------------------------------- command line


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be a positive integer")
    return value


def build_parser(description: str, repo_id: str, link_default: str = "copy") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--output_dir", type=Path, required=True, help="where the course-format data goes")
    parser.add_argument(
        "--from-dir",
        "--from_dir",
        dest="from_dir",
        type=Path,
        default=None,
        help=f"an already downloaded copy of {repo_id} (otherwise it is downloaded from the hub)",
    )
    parser.add_argument(
        "--max_samples", type=positive_int, default=None, help="stop after this many records are written"
    )
    parser.add_argument(
        "--link_mode",
        choices=LINK_MODES,
        default=link_default,
        help=f"how images taken from a folder are placed in the output (default: {link_default}); "
        "images inside a zip archive are always extracted",
    )
    return parser


def snapshot(repo_id: str, allow_patterns: list, from_dir: Path | None) -> Path:
    """The dataset folder: ``--from-dir`` when given, else a hub download of the needed files."""
    if from_dir is not None:
        return require_dir(from_dir, f"a downloaded copy of the {repo_id} dataset (--from-dir)")
    from huggingface_hub import snapshot_download

    print(f"downloading {allow_patterns} from the {repo_id} dataset repository ...")
    try:
        path = snapshot_download(repo_id=repo_id, repo_type="dataset", allow_patterns=allow_patterns)
    except Exception as err:  # noqa: BLE001 - any hub/network failure becomes one readable line
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise InputError(
            f"could not download {repo_id} ({reason}); download it yourself and pass --from-dir"
        ) from None
    return Path(path)


def write_output(tag: str, json_path: Path, image_dir: Path, result: Result, images) -> int:
    """Write the JSON file atomically and print the summary; exit code 1 when nothing survived."""
    refused = list(getattr(images, "refused", []))
    if refused:
        print(f"[{tag}] refused {len(refused)} unsafe archive entries (e.g. {refused[0]!r})")
    total = sum(result.skipped.values())
    detail = ", ".join(f"{reason}={count}" for reason, count in sorted(result.skipped.items()))
    print(f"[{tag}] skipped {total} records" + (f" ({detail})" if detail else ""))
    if not result.records:
        print(f"error: no usable records, nothing written to {json_path}", file=sys.stderr)
        return 1
    atomic_write_json(json_path, result.records)
    print(f"[{tag}] wrote {len(result.records)} records to {json_path}")
    print(f"[{tag}] image paths are relative to {image_dir}")
    return 0


def make_main(
    prepare: Callable[[argparse.Namespace], int],
    repo_id: str,
    doc: str,
    add_arguments: Callable[[argparse.ArgumentParser], None] | None = None,
    link_default: str = "copy",
) -> Callable[..., int]:
    """Build a script's ``main(argv=None) -> exit code``.

    Input problems (:class:`InputError`) become one ``error: ...`` line on stderr and exit code 2.
    """

    def main(argv=None) -> int:
        parser = build_parser(doc.strip().splitlines()[0], repo_id, link_default)
        if add_arguments is not None:
            add_arguments(parser)
        args = parser.parse_args(argv)
        try:
            return prepare(args)
        except InputError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2

    return main
