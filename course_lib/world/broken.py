"""A small, deliberately broken LLaVA dataset: one sample per kind of problem, plus valid oddities.

Notebook 02 runs the validator on it and the tests check that each problem is found and named.
`EXPECTED` maps each sample id to the problem the validator must report for it (None: no problem).
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
from PIL import Image

from course_lib.data.records import IMAGE_TOKEN

Q, A = "What is in the image?", "a red circle on the left ."


def _conv(question: str = f"<image>\n{Q}", answer: str = A) -> list[dict]:
    return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]


def write_exotic_images(folder: str | Path) -> dict[str, str]:
    """Valid but unusual images (file name -> PIL mode); all must load as RGB."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8))
    images = {
        "rgba.png": rgb.convert("RGBA"),
        "palette.png": rgb.convert("P"),
        "gray.png": rgb.convert("L"),
        "gray_alpha.png": rgb.convert("LA"),
        "bilevel.png": rgb.convert("1"),
        "cmyk.jpg": rgb.convert("CMYK"),
        "sixteen_bit.png": Image.fromarray((np.arange(48 * 64).reshape(48, 64) * 21).astype(np.uint16)),
        "one_pixel.png": Image.new("RGB", (1, 1), (200, 30, 30)),
    }
    for name, img in images.items():
        img.save(folder / name)
    return {name: Image.open(folder / name).mode for name in images}


def _write_broken_images(folder: Path) -> None:
    (folder / "corrupt.png").write_bytes(b"this is not an image")
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buffer, "JPEG")
    (folder / "truncated.jpg").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    Image.new("1", (10_000, 10_000)).save(folder / "bomb.png")  # 100 MP, about 15 KB on disk


EXPECTED = {
    "ok_rgba": None, "ok_palette": None, "ok_gray": None, "ok_gray_alpha": None, "ok_bilevel": None,
    "ok_cmyk": None, "ok_sixteen_bit": None, "ok_one_pixel": None, "ok_text_only": None, "ok_two_images": None,
    "missing": "missing_image", "corrupt": "bad_image", "truncated": "bad_image", "bomb": "image_too_large",
    "escape": "unsafe_image_path", "two_placeholders": "image_count_mismatch", "answer_first": "bad_role_order",
    "empty_answer": "empty_turn", "typo_key": "unknown_key", "too_long": "too_long", "long_text": "truncated",
}


def broken_records() -> list[dict]:
    records = [{"id": f"ok_{Path(n).stem}", "image": n, "conversations": _conv()} for n in
               ("rgba.png", "palette.png", "gray.png", "gray_alpha.png", "bilevel.png", "cmyk.jpg",
                "sixteen_bit.png", "one_pixel.png")]
    records += [
        {"id": "ok_text_only", "conversations": _conv("What is 2 plus 3?", "5")},
        {"id": "ok_two_images", "image": ["rgba.png", "gray.png"], "conversations": _conv(f"<image><image>\n{Q}")},
        {"id": "missing", "image": "nope.png", "conversations": _conv()},
        {"id": "corrupt", "image": "corrupt.png", "conversations": _conv()},
        {"id": "truncated", "image": "truncated.jpg", "conversations": _conv()},
        {"id": "bomb", "image": "bomb.png", "conversations": _conv()},
        {"id": "escape", "image": "../outside.png", "conversations": _conv()},
        {"id": "two_placeholders", "image": "gray.png", "conversations": _conv(f"<image>\n<image>\n{Q}")},
        {"id": "answer_first", "image": "gray.png", "conversations": _conv()[::-1]},
        {"id": "empty_answer", "image": "gray.png", "conversations": _conv(answer="  ")},
        {"id": "typo_key", "image": "gray.png", "conversations": _conv(), "caption": A},
        {"id": "too_long", "image": ["gray.png"] * 32, "conversations": _conv(IMAGE_TOKEN * 32 + Q)},
        {"id": "long_text", "conversations": _conv("Tell me a story.", "Once upon a time " * 40)},
    ]
    return records


def write_broken_set(folder: str | Path) -> tuple[Path, Path]:
    """Write data.json + images/ under `folder`; return (data file, image folder).

    Validate it with model_max_length=128: `too_long` then cannot fit its 32 images (at 4 or more tokens
    per image; the tiny world has 4) and `long_text` gets truncated.
    """
    folder = Path(folder)
    images = folder / "images"
    write_exotic_images(images)
    _write_broken_images(images)
    (folder / "outside.png").write_bytes((images / "gray.png").read_bytes())
    data_file = folder / "data.json"
    data_file.write_text(json.dumps(broken_records(), indent=1))
    return data_file, images
