"""CaptionEmporium/TextOCR-GPT4o: GPT-4o OCR-focused captions of Meta's TextOCR images.

Hub layout: a single `train.jsonl`, one `{"filename": "<TextOCR image>.jpg", "caption":
"DESCRIPTION\\n...\\n\\nTEXT\\n..."}` per line (`--image_field` / `--caption_field` rename the fields).
The images are NOT on the hub (TextOCR terms of service): pass `--images_dir` (the `train_images/`
folder of TextOCR / TextVQA) or `--images_zip` (`train_val_images.zip`, entries
`train_images/<id>.jpg`); images are matched by file name.

Each row becomes one single-turn record: a fixed human prompt asking for the DESCRIPTION / TEXT layout
the captions were written in, and the caption as the gpt answer.
Output: `OUT/textocr_gpt4o.json` + `OUT/images/<id>.jpg`; ids are `textocr_<image stem>`.

    python -m course_lib.prepare textocr --output_dir data/textocr_gpt4o \\
        --images_zip /data/textocr/train_val_images.zip
"""

from __future__ import annotations

import argparse
from pathlib import Path, PurePosixPath

from course_lib.data.records import IMAGE_TOKEN
from course_lib.prepare.adapt import Prepared
from course_lib.prepare.convert import Recipe
from course_lib.prepare.errors import InputError, SkipRecord
from course_lib.prepare.paths import basename
from course_lib.prepare.sources import ImageSource, Placement, open_images

REPO_ID = "CaptionEmporium/TextOCR-GPT4o"
HELP = "TextOCR-GPT4o OCR captions: train.jsonl, images from TextOCR's train_val_images.zip or train_images/"
LINK_DEFAULT = "copy"
ANNOTATION = "train.jsonl"
PROMPT = (
    f"{IMAGE_TOKEN}\nDescribe this image in one or two sentences under the heading DESCRIPTION, "
    "then transcribe any text in it, and where it is located, under the heading TEXT."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Where the TextOCR images are, and which row fields hold the file name and the caption."""
    parser.add_argument("--images_dir", type=Path, default=None, help="folder with the TextOCR train images")
    parser.add_argument("--images_zip", type=Path, default=None, help="TextOCR/TextVQA train_val_images.zip")
    parser.add_argument("--image_field", default="filename", help="row field holding the image file name")
    parser.add_argument("--caption_field", default="caption", help="row field holding the GPT-4o caption")


def adapt_row(index: int, raw: dict, image_field: str, caption_field: str) -> Prepared:
    """One caption row -> the fixed prompt and the caption; a row without both is `bad_record`."""
    name, caption = raw.get(image_field), raw.get(caption_field)
    if not isinstance(name, str) or not isinstance(caption, str) or not caption.strip():
        raise SkipRecord("bad_record", f"needs a string {image_field!r} and a non-empty {caption_field!r}")
    turns = [{"from": "human", "value": PROMPT}, {"from": "gpt", "value": caption.strip()}]
    return Prepared(id=f"textocr_{PurePosixPath(name).stem}", conversations=turns,
                    images=[(name, PurePosixPath(name).name)])


def recipe(args: argparse.Namespace) -> Recipe:
    """Refuse to start without an image source; otherwise match images by file name."""
    if args.images_dir is None and args.images_zip is None:
        raise InputError("TextOCR images are not on the hub: pass --images_dir (train_images/) "
                         "or --images_zip (train_val_images.zip)")

    def adapt(index: int, row: dict) -> Prepared:
        return adapt_row(index, row, args.image_field, args.caption_field)

    def images(source: Path, placement: Placement) -> ImageSource:
        return open_images(args.images_zip, args.images_dir,
                           "the TextOCR images (train_val_images.zip or its train_images/ folder)", placement,
                           zip_key=basename, dir_key=basename)

    return Recipe(repo_id=REPO_ID, annotation=ANNOTATION, output_json="textocr_gpt4o.json", image_folder="images",
                  adapt=adapt, images=images)
