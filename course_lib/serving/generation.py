"""Prompts and generation: chat messages, model inputs, and what "greedy" means for a model.

`GenerationSettings` says what the caller asks for; `generate_kwargs` turns that into `generate`'s
arguments, clearing whatever the checkpoint's generation_config would otherwise add.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from PIL import Image

from course_lib.serving.loading import LoadedModel

if TYPE_CHECKING:
    from transformers import BatchFeature, LlavaProcessor


@dataclass(frozen=True)
class GenerationSettings:
    """What `generate` is asked for, on top of the model's generation_config. Greedy by default."""

    max_new_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    do_sample: bool = False

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={self.max_new_tokens}: expected at least 1")
        if self.do_sample and self.temperature <= 0:
            raise ValueError(f"temperature={self.temperature}: expected > 0 when sampling (or use greedy)")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p}: expected a value in (0, 1]")

    def generate_kwargs(self) -> dict:
        """`generate`'s arguments: exactly what was asked, nothing the checkpoint's generation_config adds.

        Qwen2.5's generation_config samples (temperature 0.7, top_p 0.8, top_k 20) and sets repetition_penalty
        (1.1 for 0.5B/1.5B, 1.05 for 7B). Greedy must clear all of them: a repetition penalty would punish
        an answer for repeating a word of the question ("red or blue?" -> "red"). Sampling clears top_k and
        the penalty too, so it means only the temperature and top_p asked for. None unsets a field.
        """
        cleared = {"top_k": None, "repetition_penalty": None, "no_repeat_ngram_size": None, "min_p": None,
                   "typical_p": None}
        if self.do_sample:
            return {"max_new_tokens": self.max_new_tokens, "do_sample": True, "temperature": self.temperature,
                    "top_p": self.top_p, **cleared}
        return {"max_new_tokens": self.max_new_tokens, "do_sample": False, "temperature": None, "top_p": None,
                **cleared}

    def as_dict(self) -> dict:
        """For reports: what was asked (eval writes it next to its scores)."""
        return {"max_new_tokens": self.max_new_tokens, "do_sample": self.do_sample, "temperature": self.temperature,
                "top_p": self.top_p}


def user_message(text: str, n_images: int = 0) -> dict:
    """A user turn: its images first, each rendered as `<image>\\n`, then the text (LLaVA's layout)."""
    return {"role": "user", "content": [{"type": "image"}] * n_images + [{"type": "text", "text": text}]}


def assistant_message(text: str) -> dict:
    return {"role": "assistant", "content": [{"type": "text", "text": text}]}


def prepare_inputs(processor: LlavaProcessor, conversations: Sequence[list[dict]],
                   images: Sequence[Sequence[Image.Image]], device: torch.device, dtype: torch.dtype,
                   pad_to_square: bool = False, image_tiling: int = 0) -> BatchFeature:
    """Token ids and pixels for a batch of conversations, left-padded so generation continues each one.

    `pad_to_square` and `image_tiling` must be what the model was trained with (`LoadedModel.preprocessing`):
    tiled, each image becomes its tiles + thumbnail, and its `<image>` as many placeholders.
    """
    from course_lib.data.tiling import expand_placeholders, prepare_images

    texts = [processor.apply_chat_template(c, add_generation_prompt=True) for c in conversations]
    prepared = [prepare_images(list(group), processor, pad_to_square, image_tiling) for group in images]
    if image_tiling:
        texts = [expand_placeholders(text, counts, processor.image_token) for text, (_, counts) in zip(texts, prepared)]
    images = [group for group, _ in prepared]
    flat = [image for group in images for image in group]
    inputs = processor(text=texts, images=flat or None, padding=True, padding_side="left", return_tensors="pt")
    return inputs.to(device, dtype=dtype)  # casts pixel_values only; token ids stay integers


def generate_replies(loaded: LoadedModel, conversations: Sequence[list[dict]],
                     images: Sequence[Sequence[Image.Image]], settings: GenerationSettings | None = None) -> list[str]:
    """One answer per conversation, generated as one batch."""
    settings = settings or GenerationSettings()
    model, tokenizer = loaded.model, loaded.processor.tokenizer
    inputs = prepare_inputs(loaded.processor, conversations, images, loaded.device, loaded.dtype,
                            **loaded.preprocessing)
    with torch.inference_mode():
        out = model.generate(**inputs, **settings.generate_kwargs())
    return tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
