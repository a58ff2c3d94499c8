"""OpenGVLab/ShareGPT-4o, its image part: GPT-4o captions of images.

Hub layout (config `image_caption`, split `images`; the repository is gated, so accept its terms and
log in / set HF_TOKEN before downloading): `image_conversations/gpt-4o.jsonl`, one `{"image":
"<file>.jpg", "width": ..., "height": ..., "conversations": [{"from": "human", "value": "<image>\\n..."},
{"from": "gpt", "value": "..."}]}` per line (no `id`), and one `images.zip` at the repo root whose
entries sit under `mnt/petrelfs/wangwenhai/workspace_cef/4o/image/`. The video/audio parts are not used.
`--from_dir` may hold `images.zip` or the folder extracted from it.

Output: `OUT/sharegpt4o.json` + `OUT/images/<file>.jpg`; ids are `sharegpt4o_<line index>`.

    python -m course_lib.prepare sharegpt4o --output_dir data/sharegpt4o
"""

from __future__ import annotations

import argparse
from functools import partial
from pathlib import Path

from course_lib.prepare.adapt import from_llava_record
from course_lib.prepare.convert import Recipe
from course_lib.prepare.sources import ImageSource, Placement, open_images

REPO_ID = "OpenGVLab/ShareGPT-4o"
HELP = "ShareGPT-4o image captions (gated): image_conversations/gpt-4o.jsonl + images.zip"
LINK_DEFAULT = "copy"
ANNOTATION = "image_conversations/gpt-4o.jsonl"
ZIP_PREFIX = "mnt/petrelfs/wangwenhai/workspace_cef/4o/image/"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """ShareGPT-4o needs nothing beyond the common flags."""


def zip_name(name: str) -> str | None:
    """Entry names without the archive's `mnt/petrelfs/.../4o/image/` prefix."""
    return name.removeprefix(ZIP_PREFIX)


def _images(source: Path, placement: Placement) -> ImageSource:
    return open_images(source / "images.zip", source / ZIP_PREFIX,
                       f"images.zip from {REPO_ID} (or the {ZIP_PREFIX} folder extracted from it)", placement,
                       zip_key=zip_name)


def recipe(args: argparse.Namespace) -> Recipe:
    """LLaVA-shaped rows without ids: number them, strip the archive's prefix from image names."""
    return Recipe(repo_id=REPO_ID, annotation=ANNOTATION, output_json="sharegpt4o.json", image_folder="images",
                  adapt=partial(from_llava_record, id_prefix="sharegpt4o"), images=_images,
                  hub_files=("images.zip",))
