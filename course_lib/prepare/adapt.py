"""From a dataset's record to a course record that training accepts, checked by training's own code.

A dataset module maps each source record to a `Prepared` (its id, its turns, and where each image is
in the source and where it goes). `course_record` then finishes it: a single-image record with no
`<image>` placeholder gets `<image>\\n` prepended to its first human turn (ShareGPT-4o has such rows),
and the result must pass `course_lib.data.records.to_sample` + `check_sample`, the checks training
runs (role order, no empty turns, no `<image>` in answers, exactly one placeholder per image). A record
training would reject is skipped here with training's reason, so prepare never writes one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from course_lib.data.records import IMAGE_TOKEN, DataError, check_sample, to_sample
from course_lib.prepare.errors import SkipRecord

# The normalised roles back to the LLaVA names the course's files use.
LLAVA_ROLES = {"user": "human", "assistant": "gpt", "system": "system"}


@dataclass
class Prepared:
    """One source record in the course's terms, not yet checked.

    `images` holds `(where to find it in the source, where to put it under the image folder)` pairs.
    """

    id: str
    conversations: Any
    images: list[tuple[Any, Any]] = field(default_factory=list)


Adapter = Callable[[int, dict], Prepared]


def image_list(value: Any) -> list:
    """The `image` field of a LLaVA record as a list (absent or null means text-only)."""
    if value is None:
        return []
    return list(value) if isinstance(value, list) else [value]


def from_llava_record(index: int, raw: dict, id_prefix: str) -> Prepared:
    """A record that is already LLaVA-shaped (`id`/`image`/`conversations`); no id -> `<prefix>_<index>`."""
    rec_id = raw.get("id")
    if rec_id is None or rec_id == "":
        rec_id = f"{id_prefix}_{index:06d}"
    images = [(path, path) for path in image_list(raw.get("image"))]
    return Prepared(id=str(rec_id), conversations=raw.get("conversations"), images=images)


def with_placeholder(conversations: Any, n_images: int) -> Any:
    """A copy with `<image>\\n` before the first human turn when one image has no placeholder at all."""
    if n_images != 1 or not isinstance(conversations, list):
        return conversations
    if not all(isinstance(t, dict) and isinstance(t.get("value"), str) for t in conversations):
        return conversations  # malformed: left for to_sample to name
    if any(IMAGE_TOKEN in t["value"] for t in conversations):
        return conversations
    turns = [dict(t) for t in conversations]
    for turn in turns:
        if turn.get("from") in ("human", "user"):
            turn["value"] = f"{IMAGE_TOKEN}\n{turn['value']}"
            break
    return turns


def course_record(index: int, rec_id: str, conversations: Any, images: list[str]) -> dict:
    """`{"id", "image"?, "conversations"}` in the course's LLaVA format, or SkipRecord with training's reason."""
    record: dict = {"id": rec_id}
    if images:
        record["image"] = images[0] if len(images) == 1 else list(images)
    record["conversations"] = with_placeholder(conversations, len(images))
    try:
        sample = to_sample(record, index)
        check_sample(sample)  # to_sample runs it today; called here so prepare keeps training's rules
    except DataError as err:
        raise SkipRecord(err.reason, err.message) from None
    record["conversations"] = [{"from": LLAVA_ROLES[m["role"]], "value": m["content"]} for m in sample.messages]
    return record
