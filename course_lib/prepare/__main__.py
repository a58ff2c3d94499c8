"""`python -m course_lib.prepare <dataset> --output_dir OUT [...]`: one public dataset -> the course's format.

    python -m course_lib.prepare cc3m           --output_dir OUT [--from_dir DIR] [--max_samples N]
    python -m course_lib.prepare llava_instruct --output_dir OUT --coco_dir DIR [--annotation F] [--image_root DIR]
    python -m course_lib.prepare sharegpt4o     --output_dir OUT [--from_dir DIR]
    python -m course_lib.prepare textocr        --output_dir OUT (--images_zip ZIP | --images_dir DIR)

Every dataset also takes `--link_mode copy|symlink|hardlink` and `--max_extract_gb G`. A problem the
user must fix is one `error: ...` line on stderr and exit code 2; no usable record at all is exit code 1.
A dataset module provides `REPO_ID`, `HELP`, `LINK_DEFAULT`, `add_arguments(parser)` and `recipe(args)`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from course_lib.prepare import cc3m, llava_instruct, sharegpt4o, textocr
from course_lib.prepare.archive import DEFAULT_MAX_EXTRACT_GB, GIB
from course_lib.prepare.convert import prepare
from course_lib.prepare.sources import LINK_MODES, Placement
from course_lib.util.cli import Parser, command

DATASETS = {"cc3m": cc3m, "llava_instruct": llava_instruct, "sharegpt4o": sharegpt4o, "textocr": textocr}


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be a positive integer")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError("must be a positive number")
    return value


def _add_common(parser: argparse.ArgumentParser, repo_id: str, link_default: str) -> None:
    parser.add_argument("--output_dir", type=Path, required=True, help="where the course-format data goes")
    parser.add_argument("--from_dir", type=Path, default=None,
                        help=f"an already downloaded copy of {repo_id} (otherwise it is downloaded from the hub)")
    parser.add_argument("--max_samples", type=_positive_int, default=None,
                        help="stop after this many records are written (only their images are placed)")
    parser.add_argument("--link_mode", choices=LINK_MODES, default=link_default,
                        help=f"how images taken from a folder are placed (default: {link_default}); "
                             "images inside a zip archive are always extracted")
    parser.add_argument("--max_extract_gb", type=_positive_float, default=DEFAULT_MAX_EXTRACT_GB,
                        help=f"stop when more than this many GiB would be extracted from zip archives "
                             f"(default: {DEFAULT_MAX_EXTRACT_GB:g})")


def build_parser() -> argparse.ArgumentParser:
    """One sub-command per dataset, each with the common flags and its own."""
    parser = Parser(prog="python -m course_lib.prepare",
                                     description="Turn a public dataset into the course's LLaVA format.")
    commands = parser.add_subparsers(dest="dataset", required=True, metavar="DATASET")
    for name, module in DATASETS.items():
        sub = commands.add_parser(name, help=module.HELP, description=module.__doc__,
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
        _add_common(sub, module.REPO_ID, module.LINK_DEFAULT)
        module.add_arguments(sub)
    return parser


@command
def main(argv: list[str] | None = None) -> int:
    """Parse, prepare, and turn an InputError into one `error:` line and exit code 2."""
    args = build_parser().parse_args(argv)
    placement = Placement(link_mode=args.link_mode, max_extract_bytes=int(args.max_extract_gb * GIB))
    recipe = DATASETS[args.dataset].recipe(args)
    return prepare(args.dataset, recipe, args.output_dir, from_dir=args.from_dir,
                   max_samples=args.max_samples, placement=placement)


if __name__ == "__main__":
    sys.exit(main())
