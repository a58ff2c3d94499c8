"""Prepare liuhaotian/LLaVA-CC3M-Pretrain-595K (the pretraining / feature-alignment data).

Hub layout: ``chat.json`` (a JSON list of ``{"id": "GCC_train_002582585", "image":
"GCC_train_002582585.jpg", "conversations": [{"from": "human", "value": "...\\n<image>"},
{"from": "gpt", "value": "..."}]}``), ``metadata.json`` (not needed) and ``images.zip`` whose
entries are the flat ``GCC_train_*.jpg`` files.

Output (already the course format, as in the zero_nlp train_llava tutorial):
``OUT/chat.json`` + ``OUT/images_dl/<image>``. The records are validated, only the images that are
referenced are extracted, and ``--max_samples`` keeps the first N usable records.
``--from-dir`` may hold ``images.zip`` or an already extracted ``images_dl/`` folder.

    python data_scripts/prepare_cc3m_pretrain.py --output_dir data/LLaVA-CC3M-Pretrain-595K
"""

from __future__ import annotations

import sys
from functools import partial

import _common as c

REPO_ID = "liuhaotian/LLaVA-CC3M-Pretrain-595K"


def prepare(args) -> int:
    source = c.snapshot(REPO_ID, ["chat.json", "images.zip"], args.from_dir)
    chat = c.read_records(c.require_file(source / "chat.json", f"chat.json from {REPO_ID}"))
    images = c.open_images(
        source / "images.zip",
        source / "images_dl",
        f"images.zip from {REPO_ID} (or an extracted images_dl/ folder)",
        link_mode=args.link_mode,
    )
    image_dir = args.output_dir / "images_dl"
    adapt = partial(c.from_llava_record, id_prefix="cc3m")
    result = c.convert(chat, adapt, images, image_dir, args.max_samples)
    return c.write_output("cc3m", args.output_dir / "chat.json", image_dir, result, images)


main = c.make_main(prepare, REPO_ID, __doc__)


if __name__ == "__main__":
    sys.exit(main())
