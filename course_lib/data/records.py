"""Reading LLaVA-format data: JSON/JSONL files, three conversation formats, one normalised `Sample`.

Accepted record shapes (one per sample; `image` is a path, a list of paths, or absent for text-only):

    LLaVA       {"id", "image", "conversations": [{"from": "human"|"gpt"|"system", "value": str}, ...]}
    xtuner      {"id", "image", "conversation": [{"system"?: str, "input": str, "output": str}, ...]}
                (or LLaVA's {"from", "value"} turns under "conversation": xtuner's LLaVA data layout)
    messages    {"id", "images"|"image", "messages": [{"role": "user"|"assistant"|"system", "content": ...}]}

`content` in the messages format is a string or a list of {"type": "text", "text"} / {"type": "image"}
items (the processor's chat format). Every image appears in the text as one `<image>` placeholder, in
any human/system turn and anywhere in it (CC3M puts it at the end); the i-th placeholder is the i-th
image. `data_path` may also be a folder in the LLaVA-CC3M-Pretrain layout: `chat.json` + `images_dl/`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from course_lib.util.cli import UserError

IMAGE_TOKEN = "<image>"
CONVERSATION_KEYS = ("conversations", "conversation", "messages")
# Keys a record may carry. `type` and `answer` are the tiny world's eval fields; `width`/`height` are
# ShareGPT-4o's image sizes; `images` is the messages format's image list. Anything else is reported
# (not rejected) by the validator, since a typo such as "imgae" would silently make a sample text-only.
KNOWN_KEYS = frozenset({"id", "image", "images", *CONVERSATION_KEYS, "type", "answer", "width", "height"})
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


class DataError(UserError):
    """A problem with the data, for people: `reason` is the short key counted in `dataset.stats`."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason
        self.message = message

    def about(self, sample_id: str, data_file: str | Path) -> DataError:
        """The same error, its one-line message naming the sample and the data file."""
        return DataError(self.reason, f"sample {sample_id!r} in {data_file}: {self.reason}: {self.message}")


@dataclass(frozen=True)
class Sample:
    """One normalised sample: `messages` hold {"role", "content"} dicts with `<image>` placeholders."""

    id: str
    images: tuple[str, ...]
    messages: tuple[dict, ...]


def locate_data(data_path: str | Path, image_folder: str | Path | None = None) -> tuple[Path, Path]:
    """(data file, image folder). A folder means chat.json + images_dl/ (LLaVA-CC3M-Pretrain-595K).

    For a file, images default to a sibling `images/` folder if there is one (the layout our
    course_lib.prepare writes), else to the file's own folder.
    """
    path = Path(data_path).expanduser()
    if path.is_dir():
        data_file, default_images = path / "chat.json", path / "images_dl"
        if not data_file.is_file():
            raise DataError("missing_file", f"folder {path} has no chat.json; expected the LLaVA-CC3M-Pretrain "
                                            "layout (chat.json + images_dl/) or a .json/.jsonl file")
    elif path.is_file():
        data_file = path
        default_images = path.parent / "images" if (path.parent / "images").is_dir() else path.parent
    else:
        raise DataError("missing_file", f"no such file or folder: {path}; expected a LLaVA .json/.jsonl file "
                                        "or a folder holding chat.json")
    return data_file, Path(image_folder).expanduser() if image_folder is not None else default_images


def read_records(path: str | Path) -> list:
    """A JSON list (`[...]`) or JSON Lines (one object per line); a bad file is one DataError line."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise DataError("bad_json", f"{path} is not UTF-8 text (byte 0x{err.object[err.start]:02x} at offset "
                                    f"{err.start}); save it as UTF-8") from None
    if text.lstrip().startswith("["):
        records = _parse(text, path, "JSON")
        if not isinstance(records, list):
            raise DataError("bad_json", f"{path}: expected a JSON list of records")
        return records
    return [_parse(line, path, "JSON Lines", lineno) for lineno, line in enumerate(text.splitlines(), 1)
            if line.strip()]


def _parse(text: str, path: Path, kind: str, lineno: int = 0):
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError("bad_json", f"{path} is not valid {kind} (line {lineno or err.lineno}: {err.msg})") from None
    except RecursionError:  # Python's parser gives up near 1000 levels; no LLaVA record nests past 5
        raise DataError("bad_json", f"{path} nests too deeply (line {lineno or 1}); a LLaVA record is "
                                    "a few levels deep") from None


def duplicate_ids(records: list) -> list[str]:
    """The ids that more than one record carries, in order of first repeat."""
    seen, repeated = set(), {}
    for index, record in enumerate(records):
        sid = record_id(record, index)
        if sid in seen:
            repeated[sid] = None
        seen.add(sid)
    return list(repeated)


def record_id(record: Any, index: int) -> str:
    """The record's id as a string; records without one (ShareGPT-4o) are named by their row."""
    if isinstance(record, dict) and record.get("id") not in (None, ""):
        return str(record["id"])
    return f"row{index}"


def _text(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise DataError("bad_record", f"{where} must be a string, got {type(value).__name__}")
    return value


def _content_text(content: Any, where: str) -> str:
    """A messages-format `content`: a string, or a list of text/image items (image -> `<image>`)."""
    if not isinstance(content, list):
        return _text(content, where)
    parts = []
    for item in content:
        kind = item.get("type") if isinstance(item, dict) else None
        if kind == "image":
            parts.append(IMAGE_TOKEN)
        elif kind == "text":
            parts.append(_text(item.get("text"), f"{where} text item"))
        else:
            raise DataError("bad_record", f"{where}: content items must be {{'type': 'text'|'image'}}, got {item!r}")
    return "".join(parts)


def _messages(record: dict) -> list[dict]:
    """The conversation as [{"role", "content"}], whichever of the three formats the record uses."""
    keys = [k for k in CONVERSATION_KEYS if k in record]
    if len(keys) != 1:
        raise DataError("bad_record", f"expected exactly one of {', '.join(CONVERSATION_KEYS)}, found {keys or 'none'}")
    turns = record[keys[0]]
    if not isinstance(turns, list) or not all(isinstance(t, dict) for t in turns):
        raise DataError("bad_record", f"'{keys[0]}' must be a list of objects")
    if keys[0] == "conversations":
        return [_llava_turn(t, i) for i, t in enumerate(turns)]
    if keys[0] == "messages":
        return [{"role": _role(t.get("role"), i), "content": _content_text(t.get("content"), f"message {i}")}
                for i, t in enumerate(turns)]
    if all("from" in t and "value" in t for t in turns):  # xtuner's LLaVA data: LLaVA turns under "conversation"
        return [_llava_turn(t, i) for i, t in enumerate(turns)]
    messages = []  # xtuner's internal format: rounds of {"system"?, "input", "output"}
    for i, rnd in enumerate(turns):
        if "system" in rnd:
            messages.append({"role": "system", "content": _text(rnd["system"], f"round {i} system")})
        messages.append({"role": "user", "content": _text(rnd.get("input"), f"round {i} input")})
        messages.append({"role": "assistant", "content": _text(rnd.get("output"), f"round {i} output")})
    return messages


def _role(value: Any, index: int) -> str:
    if value not in ROLES:
        raise DataError("bad_role_order", f"turn {index} has role {value!r}; expected human/gpt/system "
                                          "(or user/assistant)")
    return ROLES[value]


def _llava_turn(turn: dict, index: int) -> dict:
    return {"role": _role(turn.get("from"), index), "content": _text(turn.get("value"), f"turn {index} value")}


def _images(record: dict) -> tuple[str, ...]:
    value = record.get("image", record.get("images"))
    if value is None:
        return ()
    images = [value] if isinstance(value, str) else value
    if not isinstance(images, list) or not all(isinstance(p, str) and p for p in images):
        raise DataError("bad_record", f"'image' must be a path or a list of paths, got {value!r}")
    return tuple(images)


def to_sample(record: Any, index: int) -> Sample:
    """Normalise one record of any accepted format; raise DataError (with its reason) if it is malformed."""
    if not isinstance(record, dict):
        raise DataError("bad_record", f"expected a JSON object, got {type(record).__name__}")
    sample = Sample(record_id(record, index), _images(record), tuple(_messages(record)))
    check_sample(sample)
    return sample


def check_sample(sample: Sample) -> None:
    """Role order (system?, then user/assistant alternating, ending on assistant), no empty turns,
    placeholders only outside answers and exactly one per image."""
    roles = [m["role"] for m in sample.messages]
    body = roles[1:] if roles[:1] == ["system"] else roles
    expected = ["user", "assistant"] * (len(body) // 2)
    if not body or body != expected:
        raise DataError("bad_role_order", f"roles {roles}; expected an optional system turn, then user/assistant "
                                          "pairs ending with the assistant")
    for i, message in enumerate(sample.messages):
        if not message["content"].strip():
            raise DataError("empty_turn", f"turn {i} ({message['role']}) is empty")
        if message["role"] == "assistant" and IMAGE_TOKEN in message["content"]:
            raise DataError("image_in_answer", f"turn {i} is an answer and contains {IMAGE_TOKEN}")
    n_placeholders = sum(m["content"].count(IMAGE_TOKEN) for m in sample.messages)
    if n_placeholders != len(sample.images):
        raise DataError("image_count_mismatch", f"{n_placeholders} {IMAGE_TOKEN} placeholders but "
                                                f"{len(sample.images)} image(s); expected one placeholder per image")


def unknown_keys(record: Any) -> list[str]:
    return sorted(set(record) - KNOWN_KEYS) if isinstance(record, dict) else []
