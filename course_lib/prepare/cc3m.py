"""liuhaotian/LLaVA-CC3M-Pretrain-595K: the pretraining (feature alignment) captions.

Hub layout: `chat.json` (a JSON list of `{"id": "GCC_train_002582585", "image":
"GCC_train_002582585.jpg", "conversations": [{"from": "human", "value": "...\\n<image>"},
{"from": "gpt", "value": "..."}]}`), `metadata.json` (not needed) and `images.zip` whose entries are
the flat `GCC_train_*.jpg` files. `--from_dir` may hold `images.zip` or an extracted `images_dl/`.

Output (already the course format, as in the zero_nlp train_llava tutorial): `OUT/chat.json` +
`OUT/images_dl/<image>`; only the images of kept records are extracted.

    python -m course_lib.prepare cc3m --output_dir data/LLaVA-CC3M-Pretrain-595K
"""

from __future__ import annotations

import argparse
from functools import partial
from pathlib import Path

from course_lib.prepare.adapt import from_llava_record
from course_lib.prepare.convert import Recipe
from course_lib.prepare.sources import ImageSource, Placement, open_images

REPO_ID = "liuhaotian/LLaVA-CC3M-Pretrain-595K"
HELP = "LLaVA-CC3M-Pretrain-595K (stage 1 captions): chat.json + images.zip"
LINK_DEFAULT = "copy"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """CC3M needs nothing beyond the common flags."""


def _images(source: Path, placement: Placement) -> ImageSource:
    return open_images(source / "images.zip", source / "images_dl",
                       f"images.zip from {REPO_ID} (or an extracted images_dl/ folder)", placement)


def recipe(args: argparse.Namespace) -> Recipe:
    """The records are LLaVA already: validate them, extract their images into images_dl/."""
    return Recipe(repo_id=REPO_ID, annotation="chat.json", output_json="chat.json", image_folder="images_dl",
                  adapt=partial(from_llava_record, id_prefix="cc3m"), images=_images, hub_files=("images.zip",))
