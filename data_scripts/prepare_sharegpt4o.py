"""Prepare the image part of OpenGVLab/ShareGPT-4o (GPT-4o image captions).

Hub layout (config ``image_caption``, split ``images``; the repository is gated, so accept its
terms and log in / set HF_TOKEN before downloading): ``image_conversations/gpt-4o.jsonl``, one
``{"image": "<file>.jpg", "width": ..., "height": ..., "conversations": [{"from": "human",
"value": "<image>\\n..."}, {"from": "gpt", "value": "..."}]}`` per line (no ``id``), and one
``images.zip`` at the repo root whose entries sit under
``mnt/petrelfs/wangwenhai/workspace_cef/4o/image/``. The video/audio parts are not used.

Output: ``OUT/sharegpt4o.json`` + ``OUT/images/<file>.jpg``; ids are ``sharegpt4o_<line index>``.
``--from-dir`` may hold ``images.zip`` or the folder extracted from it.

    python data_scripts/prepare_sharegpt4o.py --output_dir data/sharegpt4o
"""

from __future__ import annotations

import sys
from functools import partial

import _common as c

REPO_ID = "OpenGVLab/ShareGPT-4o"
ANNOTATION = "image_conversations/gpt-4o.jsonl"
ZIP_PREFIX = "mnt/petrelfs/wangwenhai/workspace_cef/4o/image/"


def zip_name(name: str) -> str | None:
    """Entry names without the archive's ``mnt/petrelfs/.../4o/image/`` prefix."""
    return name.removeprefix(ZIP_PREFIX)


def prepare(args) -> int:
    source = c.snapshot(REPO_ID, [ANNOTATION, "images.zip"], args.from_dir)
    raw = c.read_records(c.require_file(source / ANNOTATION, f"{ANNOTATION} from {REPO_ID}"))
    images = c.open_images(
        source / "images.zip",
        source / ZIP_PREFIX,
        f"images.zip from {REPO_ID} (or the {ZIP_PREFIX} folder extracted from it)",
        zip_key=zip_name,
        link_mode=args.link_mode,
    )
    image_dir = args.output_dir / "images"
    adapt = partial(c.from_llava_record, id_prefix="sharegpt4o")
    result = c.convert(raw, adapt, images, image_dir, args.max_samples)
    return c.write_output("sharegpt4o", args.output_dir / "sharegpt4o.json", image_dir, result, images)


main = c.make_main(prepare, REPO_ID, __doc__)


if __name__ == "__main__":
    sys.exit(main())
