"""Prepare liuhaotian/LLaVA-Instruct-150K (visual instruction tuning) with local COCO images.

Hub layout: JSON lists at the repo root, e.g. ``llava_instruct_150k.json`` (``"image":
"000000033471.jpg"``, a COCO train2017 file name) and ``llava_v1_5_mix665k.json`` (``"image":
"coco/train2017/000000033471.jpg"``, ``"gqa/images/..."``, ``"ocr_vqa/images/..."``,
``"textvqa/train_images/..."``, ``"vg/VG_100K/..."``; text-only records have no ``image``;
some ``id`` values are numbers). The images are not on the hub: point ``--coco_dir`` at an
already downloaded ``train2017/`` folder (and, for the other mix665k sources, ``--image_root`` at
a folder laid out like the image paths). Records whose image file is missing are skipped and counted.

Output: ``OUT/<annotation name>.json`` + ``OUT/images/<image path as in the annotation>``
(symlinks to the originals by default; ``--link_mode copy`` copies them).

    python data_scripts/prepare_llava_instruct.py --output_dir data/llava_instruct \\
        --coco_dir /data/coco/train2017
"""

from __future__ import annotations

import sys
from functools import partial
from pathlib import Path

import _common as c

REPO_ID = "liuhaotian/LLaVA-Instruct-150K"
ANNOTATIONS = ("llava_instruct_150k.json", "llava_v1_5_mix665k.json")
COCO_PREFIX = "coco/train2017/"


def coco_name(rel: str) -> str | None:
    """``coco/train2017/X.jpg`` or a bare ``X.jpg`` -> ``X.jpg`` inside --coco_dir; others -> None."""
    if rel.startswith(COCO_PREFIX):
        return rel[len(COCO_PREFIX) :]
    return rel if "/" not in rel else None


def prepare(args) -> int:
    coco_dir = c.require_dir(args.coco_dir, "the COCO train2017 images (--coco_dir)")
    sources = [c.DirImages(coco_dir, coco_name, args.link_mode)]
    if args.image_root is not None:
        root = c.require_dir(args.image_root, "a folder holding coco/, gqa/, ocr_vqa/, ... (--image_root)")
        sources.append(c.DirImages(root, link_mode=args.link_mode))
    images = c.ChainImages(sources)
    source = c.snapshot(REPO_ID, [args.annotation], args.from_dir)
    raw = c.read_records(c.require_file(source / args.annotation, f"{args.annotation} from {REPO_ID}"))
    image_dir = args.output_dir / "images"
    adapt = partial(c.from_llava_record, id_prefix=Path(args.annotation).stem)
    result = c.convert(raw, adapt, images, image_dir, args.max_samples)
    json_path = args.output_dir / args.annotation
    return c.write_output("llava_instruct", json_path, image_dir, result, images)


def add_arguments(parser) -> None:
    parser.add_argument("--coco_dir", type=Path, required=True, help="the downloaded COCO train2017/ folder")
    parser.add_argument(
        "--annotation", choices=ANNOTATIONS, default=ANNOTATIONS[0], help="which annotation file to convert"
    )
    parser.add_argument(
        "--image_root",
        type=Path,
        default=None,
        help="optional folder for the non-COCO images of llava_v1_5_mix665k.json (gqa/images/..., ...)",
    )


main = c.make_main(prepare, REPO_ID, __doc__, add_arguments, link_default="symlink")


if __name__ == "__main__":
    sys.exit(main())
