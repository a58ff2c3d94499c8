"""liuhaotian/LLaVA-Instruct-150K: visual instruction tuning, with COCO images you downloaded yourself.

Hub layout: JSON lists at the repo root, e.g. `llava_instruct_150k.json` (`"image":
"000000033471.jpg"`, a COCO train2017 file name) and `llava_v1_5_mix665k.json` (`"image":
"coco/train2017/000000033471.jpg"`, `"gqa/images/..."`, `"ocr_vqa/images/..."`,
`"textvqa/train_images/..."`, `"vg/VG_100K/..."`; text-only records have no `image`; some `id` values
are numbers). The images are not on the hub: point `--coco_dir` at a downloaded `train2017/` folder
(and, for the other mix665k sources, `--image_root` at a folder laid out like the image paths).
Records whose image file is missing are skipped and counted.

Output: `OUT/<annotation name>.json` + `OUT/images/<image path as in the annotation>` (symlinks to the
originals by default, so COCO is not copied; `--link_mode copy` copies them).

    python -m course_lib.prepare llava_instruct --output_dir data/llava_instruct --coco_dir /data/coco/train2017
"""

from __future__ import annotations

import argparse
from functools import partial
from pathlib import Path

from course_lib.prepare.adapt import from_llava_record
from course_lib.prepare.convert import Recipe
from course_lib.prepare.paths import require_dir
from course_lib.prepare.sources import ChainImages, DirImages, ImageSource, Placement

REPO_ID = "liuhaotian/LLaVA-Instruct-150K"
HELP = "LLaVA-Instruct-150K / llava_v1_5_mix665k (stage 2), images from a local COCO train2017"
LINK_DEFAULT = "symlink"
ANNOTATIONS = ("llava_instruct_150k.json", "llava_v1_5_mix665k.json")
COCO_PREFIX = "coco/train2017/"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Where the images are (they are not on the hub) and which annotation file to convert."""
    parser.add_argument("--coco_dir", type=Path, required=True, help="the downloaded COCO train2017/ folder")
    parser.add_argument("--annotation", choices=ANNOTATIONS, default=ANNOTATIONS[0],
                        help="which annotation file to convert")
    parser.add_argument("--image_root", type=Path, default=None,
                        help="optional folder for the non-COCO images of llava_v1_5_mix665k.json (gqa/images/...)")


def coco_name(rel: str) -> str | None:
    """`coco/train2017/X.jpg` or a bare `X.jpg` -> `X.jpg` inside --coco_dir; other paths -> None."""
    if rel.startswith(COCO_PREFIX):
        return rel[len(COCO_PREFIX):]
    return rel if "/" not in rel else None


def recipe(args: argparse.Namespace) -> Recipe:
    """Check the image folders first (before any download), then convert the chosen annotation file."""
    coco_dir = require_dir(args.coco_dir, "the COCO train2017 images (--coco_dir)")
    root = args.image_root
    if root is not None:
        require_dir(root, "a folder holding coco/, gqa/, ocr_vqa/, ... (--image_root)")

    def images(source: Path, placement: Placement) -> ImageSource:
        sources: list[ImageSource] = [DirImages(coco_dir, coco_name, placement.link_mode)]
        if root is not None:
            sources.append(DirImages(root, link_mode=placement.link_mode))
        return ChainImages(sources)

    return Recipe(repo_id=REPO_ID, annotation=args.annotation, output_json=args.annotation, image_folder="images",
                  adapt=partial(from_llava_record, id_prefix=Path(args.annotation).stem), images=images)
