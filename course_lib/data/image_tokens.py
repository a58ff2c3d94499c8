"""Image tokens: how many one `<image>` becomes, and where they are expanded into the prompt's ids.

LLaVA splices one token per vision patch into the prompt: the processor (transformers'
`LlavaProcessor.replace_image_token`) repeats the `<image>` token that many times, and the model puts one
projected patch feature at each of them (`masked_scatter`). CLIP-L/336 gives (336 / 14)^2 = 576 tokens;
the tiny world's CLIP (64 px, patch 32) gives 4.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from course_lib.data.records import IMAGE_TOKEN, DataError

if TYPE_CHECKING:
    from transformers import CLIPVisionConfig, LlavaProcessor, PreTrainedTokenizerBase, ProcessorMixin


def num_image_tokens(vision_config: CLIPVisionConfig | Mapping[str, int]) -> int:
    """Tokens per image of a vision tower's config (a `CLIPVisionConfig` or a dict of its fields): one per
    patch, CLS dropped (LLaVA's `vision_feature_select_strategy="default"`)."""
    get = vision_config.get if isinstance(vision_config, Mapping) else vision_config.__getattribute__
    return (get("image_size") // get("patch_size")) ** 2


def _height_width(size) -> tuple[int, int] | None:
    if isinstance(size, int):
        return size, size
    height, width = (size.get("height"), size.get("width")) if size is not None else (None, None)
    return (height, width) if height and width else None


def image_size(processor: ProcessorMixin) -> tuple[int, int]:
    """(height, width) of the images the processor outputs: its crop size, or its fixed resize size."""
    image_processor = processor.image_processor
    cropped = getattr(image_processor, "do_center_crop", False)
    hw = _height_width(image_processor.crop_size if cropped else image_processor.size)
    if hw is None:
        raise DataError("processor", "the image processor has no fixed output size (crop_size, or size with height "
                                     "and width), so the number of tokens per image would vary")
    return hw


def image_token_count(processor: LlavaProcessor) -> int:
    """Tokens one `<image>` becomes, from the processor's config: 4 for the tiny world, 576 for CLIP-L/336.

    Mirrors `LlavaProcessor.replace_image_token`: (H / patch) * (W / patch) patches, plus CLS (as
    `num_additional_image_tokens`), minus CLS again when `vision_feature_select_strategy == "default"`.
    """
    fixed = getattr(processor, "image_seq_length", None)
    if fixed:
        return int(fixed)
    if not processor.patch_size:
        raise DataError("processor", "the processor has no patch_size, so the tokens per image are unknown")
    height, width = image_size(processor)
    n = (height // processor.patch_size) * (width // processor.patch_size) + processor.num_additional_image_tokens
    return n - 1 if processor.vision_feature_select_strategy == "default" else n


def expand_image_tokens(text: str, tokenizer: PreTrainedTokenizerBase, image_token_id: int,
                        tokens_per_image: int) -> list[int]:
    """Token ids of `text` with each `<image>` expanded to `tokens_per_image` image-token ids: what the
    processor does to a prompt, done piece by piece so that the text around each image tokenizes alone."""
    ids: list[int] = []
    for k, piece in enumerate(text.split(IMAGE_TOKEN)):
        if k:
            ids += [image_token_id] * tokens_per_image
        if piece:
            ids += tokenizer(piece, add_special_tokens=False)["input_ids"]
    return ids
