"""The one preparation pipeline every dataset runs: read -> adapt -> validate -> place images -> write -> summary.

A dataset is described by a small `Recipe` (which files, which adapter, which image folder); `prepare`
does everything else the same way for all of them. The output is a JSON list at
`<output_dir>/<output_json>` whose records look like

    {"id": "...", "image": "relative/path.jpg",            # or a list, or absent for text-only
     "conversations": [{"from": "human", "value": "<image>\\n..."}, {"from": "gpt", "value": "..."}]}

with every image placed under `<output_dir>/<image_folder>/`. A record that cannot be used is skipped
and counted by reason, and the first record skipped for each reason is named in the summary.
"""

from __future__ import annotations

import sys
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from course_lib.data.records import DataError, read_records
from course_lib.prepare.adapt import Adapter, Prepared, course_record
from course_lib.prepare.errors import InputError, SkipRecord
from course_lib.prepare.hub import snapshot
from course_lib.prepare.paths import is_image_name, is_inside, require_file, safe_relpath
from course_lib.prepare.sources import ImageSource, Placement
from course_lib.util.files import atomic_write_json


@dataclass(frozen=True)
class Recipe:
    """What one dataset needs; `prepare` does the rest.

    `images(snapshot folder, placement)` opens the dataset's image source; it may ignore the snapshot
    when the images live elsewhere (COCO, TextOCR). `hub_files` are downloaded along with `annotation`.
    """

    repo_id: str
    annotation: str  # the records file, relative to the snapshot folder
    output_json: str  # written as <output_dir>/<output_json>
    image_folder: str  # images go under <output_dir>/<image_folder>/
    adapt: Adapter
    images: Callable[[Path, Placement], ImageSource]
    hub_files: tuple[str, ...] = ()


@dataclass
class Result:
    """The records kept, and per skip reason how many were skipped and the first one's description."""

    records: list[dict] = field(default_factory=list)
    skipped: Counter = field(default_factory=Counter)
    examples: dict[str, str] = field(default_factory=dict)

    def skip(self, reason: str, example: str) -> None:
        self.skipped[reason] += 1
        self.examples.setdefault(reason, example)


def convert(raw_records: Iterable, adapt: Adapter, images: ImageSource | None, image_dir: Path,
            max_samples: int | None = None) -> Result:
    """Adapt, check and place records until `max_samples` of them have been kept."""
    result = Result()
    placed: set[str] = set()
    for index, raw in enumerate(raw_records):
        if max_samples is not None and len(result.records) >= max_samples:
            break
        name = f"row {index}"
        try:
            if not isinstance(raw, dict):
                raise SkipRecord("bad_record", f"expected a JSON object, got {type(raw).__name__}")
            item = adapt(index, raw)
            name = f"{item.id!r}"
            result.records.append(_finish(index, item, images, image_dir, placed))
        except SkipRecord as skip:
            result.skip(skip.reason, f"record {name}: {skip.detail}")
    return result


def _finish(index: int, item: Prepared, images: ImageSource | None, image_dir: Path, placed: set[str]) -> dict:
    """Check paths, then the conversation, then find every image, and only then place any of them."""
    pairs = []
    for src, dst in item.images:
        src_rel, dst_rel = safe_relpath(src), safe_relpath(dst)
        if src_rel is None or dst_rel is None or not is_inside(image_dir, image_dir / dst_rel):
            raise SkipRecord("unsafe_image_path", f"image path {src!r} is absolute, has '..' or is not a path")
        if not (is_image_name(src_rel) and is_image_name(dst_rel)):
            raise SkipRecord("not_an_image", f"{src_rel!r} does not end in an image extension")
        pairs.append((src_rel, dst_rel))
    record = course_record(index, item.id, item.conversations, [dst_rel for _, dst_rel in pairs])
    writers = []
    for src_rel, dst_rel in pairs:
        writer = images.get(src_rel) if images is not None else None
        if writer is None:
            raise SkipRecord("missing_image", f"image {src_rel!r} is not in the image source")
        writers.append((writer, dst_rel))
    for writer, dst_rel in writers:
        if dst_rel not in placed:
            dst = image_dir / dst_rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            writer(dst)
            placed.add(dst_rel)
    return record


def write_output(tag: str, json_path: Path, image_dir: Path, result: Result, images: ImageSource | None) -> int:
    """Print the summary and write the JSON atomically; exit code 1 (nothing written) when nothing survived."""
    refused = list(getattr(images, "refused", []))
    if refused:
        print(f"[{tag}] refused {len(refused)} unsafe archive entries (e.g. {refused[0]!r})")
    total = sum(result.skipped.values())
    detail = ", ".join(f"{reason}={count}" for reason, count in sorted(result.skipped.items()))
    print(f"[{tag}] skipped {total} records" + (f" ({detail})" if detail else ""))
    for reason in sorted(result.examples):
        print(f"[{tag}]   {reason}, first: {result.examples[reason]}")
    if not result.records:
        print(f"error: no usable records, nothing written to {json_path}", file=sys.stderr)
        return 1
    atomic_write_json(json_path, result.records)
    print(f"[{tag}] wrote {len(result.records)} records to {json_path}")
    print(f"[{tag}] image paths are relative to {image_dir}")
    return 0


def prepare(tag: str, recipe: Recipe, output_dir: Path, from_dir: Path | None = None,
            max_samples: int | None = None, placement: Placement | None = None) -> int:
    """Run the whole pipeline for one dataset; InputError for problems the user must fix."""
    placement = placement or Placement()
    source = snapshot(recipe.repo_id, [recipe.annotation, *recipe.hub_files], from_dir)
    annotation = require_file(source / recipe.annotation, f"{recipe.annotation} from {recipe.repo_id}")
    try:
        raw = read_records(annotation)
    except DataError as err:
        raise InputError(err.message) from None
    images = recipe.images(source, placement)
    image_dir = output_dir / recipe.image_folder
    result = convert(raw, recipe.adapt, images, image_dir, max_samples)
    return write_output(tag, output_dir / recipe.output_json, image_dir, result, images)
