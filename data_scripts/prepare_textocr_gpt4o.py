"""Prepare CaptionEmporium/TextOCR-GPT4o (GPT-4o OCR-focused captions of Meta's TextOCR images).

Hub layout: a single ``train.jsonl``, one ``{"filename": "<TextOCR image>.jpg", "caption":
"DESCRIPTION\\n...\\n\\nTEXT\\n..."}`` per line (the field names can be changed with
``--image_field`` / ``--caption_field``). The images are NOT on the hub (TextOCR terms of
service): pass ``--images_dir`` (the ``train_images/`` folder of TextOCR / TextVQA) or
``--images_zip`` (``train_val_images.zip``, entries ``train_images/<id>.jpg``); images are
matched by file name.

Each row becomes one single-turn record: a fixed human prompt asking for the DESCRIPTION / TEXT
layout the captions were generated with, and the caption as the gpt answer.
Output: ``OUT/textocr_gpt4o.json`` + ``OUT/images/<id>.jpg``; ids are ``textocr_<image stem>``.

    python data_scripts/prepare_textocr_gpt4o.py --output_dir data/textocr_gpt4o \\
        --images_zip /data/textocr/train_val_images.zip
"""

from __future__ import annotations

import sys
from pathlib import Path, PurePosixPath

import _common as c

REPO_ID = "CaptionEmporium/TextOCR-GPT4o"
ANNOTATION = "train.jsonl"
PROMPT = (
    f"{c.IMAGE_TOKEN}\nDescribe this image in one or two sentences under the heading DESCRIPTION, "
    "then transcribe any text in it, and where it is located, under the heading TEXT."
)


def adapt_row(index: int, raw: dict, image_field: str, caption_field: str) -> c.Prepared:
    name, caption = raw.get(image_field), raw.get(caption_field)
    if not isinstance(name, str) or not isinstance(caption, str) or not caption.strip():
        raise c.SkipRecord("bad_record")
    stem = PurePosixPath(name).stem
    turns = [{"from": "human", "value": PROMPT}, {"from": "gpt", "value": caption.strip()}]
    return c.Prepared(id=f"textocr_{stem}", conversations=turns, images=[(name, PurePosixPath(name).name)])


def prepare(args) -> int:
    if args.images_dir is None and args.images_zip is None:
        raise c.InputError(
            "TextOCR images are not on the hub: pass --images_dir (train_images/) "
            "or --images_zip (train_val_images.zip)"
        )
    source = c.snapshot(REPO_ID, [ANNOTATION], args.from_dir)
    raw = c.read_records(c.require_file(source / ANNOTATION, f"{ANNOTATION} from {REPO_ID}"))
    images = c.open_images(
        args.images_zip,
        args.images_dir,
        "the TextOCR images (train_val_images.zip or its train_images/ folder)",
        zip_key=c.basename,
        dir_key=c.basename,
        link_mode=args.link_mode,
    )
    image_dir = args.output_dir / "images"

    def adapt(index: int, row: dict) -> c.Prepared:
        return adapt_row(index, row, args.image_field, args.caption_field)

    result = c.convert(raw, adapt, images, image_dir, args.max_samples)
    return c.write_output("textocr_gpt4o", args.output_dir / "textocr_gpt4o.json", image_dir, result, images)


def add_arguments(parser) -> None:
    parser.add_argument("--images_dir", type=Path, default=None, help="folder with the TextOCR train images")
    parser.add_argument("--images_zip", type=Path, default=None, help="TextOCR/TextVQA train_val_images.zip")
    parser.add_argument("--image_field", default="filename", help="row field holding the image file name")
    parser.add_argument("--caption_field", default="caption", help="row field holding the GPT-4o caption")


main = c.make_main(prepare, REPO_ID, __doc__, add_arguments)


if __name__ == "__main__":
    sys.exit(main())
