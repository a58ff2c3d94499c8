"""Check a LLaVA-format dataset before training on it: every problem, named by sample id.

    python -m course_lib.data validate --data X.json --images DIR [--processor DIR|tiny]
        [--template chat|plain] [--model_max_length N]

`--data` may be a folder holding chat.json (images then default to its images_dl/). Each problem is one
line, `error|warning  <sample id>  <reason>: <message>`, followed by a summary: counts per reason and a
histogram of the text tokens per sample. Exit code 1 if there are errors, 0 otherwise, 2 for bad
arguments. Warnings (training still uses the sample): `unknown_key`, `truncated`, `duplicate_id` (an
error for `course_lib.eval`, which joins answers by id). Unusual but valid
images (RGBA, CMYK, palette, 16-bit, grayscale, 1x1) are not problems: they load as RGB.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from course_lib.data.images import MAX_IMAGE_PIXELS, load_image, resolve_image_path
from course_lib.data.labels import TEMPLATES, PromptEncoder
from course_lib.data.records import DataError, locate_data, read_records, record_id, to_sample, unknown_keys
from course_lib.util.cli import Parser, UserError, command

if TYPE_CHECKING:
    from transformers import ProcessorMixin

WARNINGS = frozenset({"unknown_key", "truncated", "duplicate_id"})


@dataclass
class Report:
    problems: list[tuple[str, str, str]] = field(default_factory=list)  # (sample id, reason, message)
    text_lengths: list[int] = field(default_factory=list)
    n_samples: int = 0

    @property
    def n_errors(self) -> int:
        return sum(reason not in WARNINGS for _, reason, _ in self.problems)


def _image_problems(sample, image_folder: Path, max_pixels: int) -> list[DataError]:
    found = []
    for relpath in sample.images:
        try:
            load_image(resolve_image_path(image_folder, relpath), max_pixels)
        except DataError as err:
            found.append(err)
    return found


def _length_problems(encoded, encoder: PromptEncoder, max_length: int) -> list[DataError]:
    if len(encoded.input_ids) <= max_length:
        return []
    if encoder.truncate(encoded, max_length) is None:
        return [DataError("too_long", f"{len(encoded.input_ids)} tokens cannot fit its images and an answer "
                                      f"token in model_max_length={max_length}; training drops it")]
    return [DataError("truncated", f"{len(encoded.input_ids)} tokens > model_max_length={max_length}; "
                                   "training truncates its tail")]


def check_record(record: Any, index: int, encoder: PromptEncoder, image_folder: Path, max_length: int,
                 max_pixels: int = MAX_IMAGE_PIXELS) -> tuple[list[DataError], int | None]:
    """The problems of one record, and its text token count (None when it cannot be encoded)."""
    problems = [DataError("unknown_key", f"unknown key {key!r} (ignored)") for key in unknown_keys(record)]
    try:
        sample = to_sample(record, index)
    except DataError as err:
        return [*problems, err], None
    problems += _image_problems(sample, image_folder, max_pixels)
    try:
        encoded = encoder.encode(sample)
        encoder.check(encoded)
    except DataError as err:
        return [*problems, err], None
    n_text = len(encoded.input_ids) - encoded.n_images * encoder.tokens_per_image
    return problems + _length_problems(encoded, encoder, max_length), n_text


def validate(data_file: Path, image_folder: Path, processor: ProcessorMixin, template: str = "chat",
             max_length: int = 2048, max_pixels: int = MAX_IMAGE_PIXELS) -> Report:
    encoder, report, seen = PromptEncoder(processor, template), Report(), set()
    for index, record in enumerate(read_records(data_file)):
        problems, n_text = check_record(record, index, encoder, image_folder, max_length, max_pixels)
        sid = record_id(record, index)
        if sid in seen:  # training does not mind; eval joins answers by id and refuses the file
            problems.append(DataError("duplicate_id", "this id is used by an earlier record too"))
        seen.add(sid)
        report.problems += [(sid, p.reason, p.message) for p in problems]
        report.text_lengths += [] if n_text is None else [n_text]
        report.n_samples += 1
    return report


def histogram(values: list[int], bins: int = 8, width: int = 40) -> list[str]:
    """Text histogram lines `lo-hi | ##### count` over equal-width bins."""
    if not values:
        return ["  (no samples)"]
    lo, hi = min(values), max(values)
    step = max(1, -(-(hi - lo + 1) // bins))
    counts = Counter((v - lo) // step for v in values)
    top = max(counts.values())
    bars = {b: "#" * round(width * counts[b] / top) for b in range(max(counts) + 1)}
    return [f"  {lo + b * step:6d}-{lo + (b + 1) * step - 1:6d} | {bar or '.'} {counts[b]}" for b, bar in bars.items()]

def format_report(report: Report, tokens_per_image: int) -> str:
    width = max((len(sid) for sid, _, _ in report.problems), default=0)
    lines = [f"{'warning' if reason in WARNINGS else 'error':7s}  {sid:{width}s}  {reason}: {message}"
             for sid, reason, message in report.problems]
    bad = {sid for sid, reason, _ in report.problems if reason not in WARNINGS}
    lines += ["", f"checked {report.n_samples} samples: {len(bad)} with errors, "
                  f"{report.n_errors} errors, {len(report.problems) - report.n_errors} warnings"]
    for reason, n in sorted(Counter(reason for _, reason, _ in report.problems).items()):
        lines.append(f"  {reason:22s} {n:6d}  {'warning' if reason in WARNINGS else 'error'}")
    lines += ["", f"text tokens per sample (image tokens not counted: {tokens_per_image} per image):"]
    return "\n".join(lines + histogram(report.text_lengths))


def _parser() -> argparse.ArgumentParser:
    parser = Parser(prog="python -m course_lib.data validate", description=__doc__.split("\n")[0])
    parser.add_argument("--data", required=True, help="LLaVA .json/.jsonl file, or a folder holding chat.json")
    parser.add_argument("--images", help="image folder (default: images_dl/ next to chat.json, else images/)")
    parser.add_argument("--processor", default="tiny", help="LlavaProcessor folder, or 'tiny' (default)")
    parser.add_argument("--template", default="chat", choices=TEMPLATES)
    parser.add_argument("--model_max_length", type=int, default=2048)
    parser.add_argument("--max_image_pixels", type=int, default=MAX_IMAGE_PIXELS)
    return parser


def load_processor(name: str) -> ProcessorMixin:
    """'tiny' -> the tiny world's processor; otherwise a saved LlavaProcessor folder (never the hub)."""
    if name == "tiny":
        from course_lib.build import build_llava
        from course_lib.util.quiet import quiet_transformers

        with quiet_transformers(progress_bars=False):  # no "Loading weights" bars in the report
            return build_llava("tiny", "tiny")[1]
    # transformers 5 saves processor_config.json (older versions: preprocessor_config.json only).
    if not any((Path(name) / f).is_file() for f in ("processor_config.json", "preprocessor_config.json")):
        raise DataError("processor", f"--processor {name}: expected a folder with a saved LlavaProcessor "
                                     "(processor_config.json or preprocessor_config.json, tokenizer files) or 'tiny'")
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(name)


@command
def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.model_max_length < 2:
        raise UserError(f"--model_max_length {args.model_max_length}: expected at least 2")
    if args.max_image_pixels < 1:
        raise UserError(f"--max_image_pixels {args.max_image_pixels}: expected a positive pixel count")
    data_file, image_folder = locate_data(args.data, args.images)
    if not image_folder.is_dir():
        raise UserError(f"--images {image_folder}: no such folder")
    processor = load_processor(args.processor)
    report = validate(data_file, image_folder, processor, args.template, args.model_max_length,
                      args.max_image_pixels)
    print(format_report(report, PromptEncoder(processor, args.template).tokens_per_image))
    return 1 if report.n_errors else 0


if __name__ == "__main__":
    sys.exit(main())
