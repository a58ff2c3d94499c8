"""Opening images safely: confined paths, no decompression bombs, every mode to RGB.

Real datasets hold RGBA screenshots, palette GIFs, CMYK JPEGs, 16-bit PNGs and the odd 1x1 pixel; all
of them are valid and become 8-bit RGB here. What is refused, with an ImageError (a DataError) naming the
file: paths that leave the image folder, missing files and non-files, files PIL cannot decode (corrupt or
truncated), and images with more pixels than `max_pixels` (a decompression bomb). Training, eval, the chat
and the widget all open images through `load_image`, so they see the same pixels.
"""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageOps

from course_lib.data.records import DataError

if TYPE_CHECKING:
    from transformers import BaseImageProcessor

# PIL's own warning threshold (about 89.5 MP); PIL only *errors* at twice that. We refuse at it.
MAX_IMAGE_PIXELS = 89_478_485
WHITE = (255, 255, 255)
SIXTEEN_BIT_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N")


def resolve_image_path(image_folder: str | Path, relpath: str) -> Path:
    """`image_folder / relpath`, refusing any path that ends up outside the folder (`../`, absolute).

    The folders on the way are resolved (so a symlinked folder cannot lead out either); the file itself
    may be a symlink, because course_lib.prepare links images into place (`--link_mode symlink`).
    """
    if not isinstance(relpath, str) or not relpath or "\x00" in relpath:
        raise DataError("unsafe_image_path", f"image path {relpath!r} is not a usable file name")
    root = Path(image_folder).resolve()
    candidate = Path(image_folder) / relpath  # an absolute relpath replaces the folder here
    if candidate.name in ("", ".", ".."):
        raise DataError("unsafe_image_path", f"image path {relpath!r} names a folder, not a file")
    resolved = candidate.parent.resolve() / candidate.name
    if not resolved.is_relative_to(root):
        raise DataError("unsafe_image_path", f"image path {relpath!r} leaves the image folder {image_folder}")
    return resolved


class ImageError(DataError):
    """An image that cannot be used, in one line naming the file: `reason` is missing_image, not_a_file,
    bad_image or image_too_large (the keys `LlavaDataset.stats` counts)."""


def load_image(source: str | Path | bytes | Image.Image, max_pixels: int = MAX_IMAGE_PIXELS, *,
               name: str | None = None) -> Image.Image:
    """The one image loader, for training, eval, chat and uploads: an upright 8-bit RGB image.

    `source` is a path, raw bytes (an upload) or a PIL image. Refused with an ImageError: a missing path,
    anything that is not a regular file (a named pipe would block `open` forever), files Pillow cannot
    decode (corrupt or truncated), and images over `max_pixels` (a decompression bomb: a few KB on disk,
    GBs in memory), checked on the header before any pixel is decoded. EXIF orientation is applied, as
    phones store portrait photos as rotated landscape pixels plus an orientation tag.
    """
    if isinstance(source, Image.Image):
        name, image = name or "image", source
    else:
        name = name or (str(source) if isinstance(source, str | Path) else "uploaded image")
        if isinstance(source, str | Path):
            if not os.path.lexists(source):
                raise ImageError("missing_image", f"{name}: no such file")
            if not os.path.isfile(source):
                raise ImageError("not_a_file", f"{name}: not a regular file")
        try:
            with warnings.catch_warnings():  # Pillow warns from 89 MP on; the size is checked below instead
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                image = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
        except Image.DecompressionBombError:
            raise ImageError("image_too_large", f"{name}: too large: refused by Pillow as a decompression bomb "
                                                f"(the limit is {max_pixels:,} pixels)") from None
        except (OSError, SyntaxError, ValueError):  # UnidentifiedImageError is an OSError
            raise ImageError("bad_image", f"{name}: not an image Pillow can read (expected PNG, JPEG, WebP, ...)"
                             ) from None
    width, height = image.size
    if width * height > max_pixels:
        image.close()
        raise ImageError("image_too_large", f"{name}: too large: {width}x{height} = {width * height:,} pixels, "
                                            f"over the limit of {max_pixels:,} (a possible decompression bomb)")
    try:
        image.load()
        return to_rgb(ImageOps.exif_transpose(image))
    except Exception as err:  # truncated data surfaces as OSError, SyntaxError, ValueError, ...
        raise ImageError("bad_image", f"{name}: corrupt or truncated image ({type(err).__name__})") from None


def to_rgb(img: Image.Image) -> Image.Image:
    """8-bit RGB from any PIL mode: transparency composited on white, 16-bit rescaled, the rest converted."""
    if img.mode in SIXTEEN_BIT_MODES:
        # PIL's own I;16 -> RGB conversion clips at 255, turning most of a 16-bit image white;
        # scale the 0..65535 range down to 0..255 instead.
        values = np.clip(np.asarray(img, dtype=np.int64), 0, 65535) >> 8
        return Image.fromarray(values.astype(np.uint8)).convert("RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (*WHITE, 255)), rgba).convert("RGB")
    return img.convert("RGB")  # 1, L, P, CMYK, YCbCr, LAB, HSV, RGBX


def expand2square(img: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    """Pad to a square, centred, with `background` (the processor's mean colour) instead of cropping.

    LLaVA-1.5's `image_aspect_ratio == "pad"` (haotian-liu/LLaVA, llava/train/train.py, expand2square
    in LazySupervisedDataset.__getitem__): CLIP's centre crop would otherwise cut off wide images' sides.
    """
    width, height = img.size
    if width == height:
        return img
    side = max(width, height)
    result = Image.new(img.mode, (side, side), background)
    result.paste(img, ((side - width) // 2, (side - height) // 2))
    return result


def mean_colour(image_processor: BaseImageProcessor) -> tuple[int, int, int]:
    """The image processor's `image_mean` as 0..255 RGB: padding with it normalises to zeros."""
    return tuple(int(x * 255) for x in image_processor.image_mean)
