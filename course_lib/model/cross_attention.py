"""Fusion by gated cross-attention (Flamingo), the alternative to splicing image tokens into the prompt.

LLaVA puts the projected image features *into the prompt*, as tokens. Flamingo (Alayrac et al. 2022, Fig. 4)
keeps the language model's input text-only, apart from one `<image>` tag token per image, and lets the text
*read* the image inside the language model: before each chosen decoder layer sits a GATED XATTN-DENSE block,

    x = x + tanh(a) * CrossAttention(LN(x), image features)      # only where the sample has an image
    x = x + tanh(b) * FeedForward(LN(x))                         # on every token, image or not

with the gates a and b starting at 0, so the untrained model is exactly the language model. The language
model stays frozen; only the new blocks (and the tag embedding) train. DeepSpeed-VisualChat's MMCA is a
relative: the text attends to image and text keys in one attention (source 000 reports that it hurt the
language model's own ability).

Wired into a transformers Llava model for the course's experiments (notebook 09), without forking its code:
the module sits where the projector sits, so the model's own `get_image_features` hands it the vision
features (it keeps them and returns the tag embedding, one token per image), and forward pre-hooks run the
blocks before the decoder layers. Simplifications, said plainly: every token of a sample attends to all of
its images (Flamingo lets a token see only the image just before it), and there is no Perceiver resampler
(the tiny CLIP gives 4 patches per image). Teacher-forced scoring only: `generate` with a KV cache is not
supported, and the model does not load back with `from_pretrained`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from transformers import LlavaForConditionalGeneration, LlavaProcessor


class GatedCrossAttention(nn.Module):
    """Flamingo's GATED XATTN-DENSE block: gated cross-attention to the images, then a gated feed-forward."""

    def __init__(self, dim: int, vision_dim: int, heads: int = 4, ff_mult: int = 2):
        super().__init__()
        self.norm, self.ff_norm = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, kdim=vision_dim, vdim=vision_dim, batch_first=True)
        self.ff = nn.Sequential(nn.Linear(dim, ff_mult * dim), nn.GELU(), nn.Linear(ff_mult * dim, dim))
        self.attn_gate, self.ff_gate = nn.Parameter(torch.zeros(1)), nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor, media: torch.Tensor | None, padding: torch.Tensor | None) -> torch.Tensor:
        if media is not None:
            has_image = (~padding).any(1)
            padding = padding.clone()
            padding[~has_image, 0] = False  # a row with no image would attend to nothing (NaN); zeroed below
            read = self.attn(self.norm(x), media, media, key_padding_mask=padding, need_weights=False)[0]
            x = x + torch.tanh(self.attn_gate) * read * has_image[:, None, None]
        return x + torch.tanh(self.ff_gate) * self.ff(self.ff_norm(x))


class CrossAttentionFusion(nn.Module):
    """Sits in the projector's place: keeps the image features, returns one tag embedding per image."""

    def __init__(self, vision_dim: int, text_dim: int, num_blocks: int, heads: int = 4, ff_mult: int = 2):
        super().__init__()
        self.tag = nn.Parameter(torch.randn(text_dim) * 0.02)
        self.blocks = nn.ModuleList(GatedCrossAttention(text_dim, vision_dim, heads, ff_mult)
                                    for _ in range(num_blocks))
        self.features: torch.Tensor | None = None
        self.images_per_row: list[int] = []

    def tokens_out(self, patches: int) -> int:
        return 1

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        self.features = features  # [images, patches, vision_dim], in the order the images appear in the batch
        return self.tag.expand(features.shape[0], 1, -1)

    def media(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Each row's images side by side, [rows, most images x patches, vision_dim], and the padding mask."""
        if self.features is None:
            return None, None
        n, patches, dim = self.features.shape
        width = max(self.images_per_row) * patches
        media = self.features.new_zeros(len(self.images_per_row), max(width, patches), dim)
        padding = torch.ones(media.shape[:2], dtype=torch.bool, device=media.device)
        for row, images in enumerate(torch.split(self.features, self.images_per_row)):
            media[row, :images.numel() // dim] = images.reshape(-1, dim)
            padding[row, :images.numel() // dim] = False
        return media, padding


def use_cross_attention(model: LlavaForConditionalGeneration, processor: LlavaProcessor, every: int = 2,
                        seed: int = 0, **kwargs) -> CrossAttentionFusion:
    """Replace the projector by gated cross-attention blocks before every `every`-th decoder layer."""
    layers = model.model.language_model.layers
    chosen = list(range(0, len(layers), every))
    torch.manual_seed(seed)
    fusion = CrossAttentionFusion(model.config.vision_config.hidden_size, model.config.text_config.hidden_size,
                                  len(chosen), **kwargs)
    model.model.multi_modal_projector = fusion
    processor.image_seq_length = 1  # the <image> tag: one token per image
    image_id = model.config.image_token_id

    def start(module, args, kwargs):  # LlavaModel.forward: which row holds which images
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        fusion.features = None
        fusion.images_per_row = (input_ids == image_id).sum(1).tolist() if input_ids is not None else []

    def before_layer(block: GatedCrossAttention):
        def hook(module, args, kwargs):
            return (block(args[0], *fusion.media()), *args[1:]), kwargs
        return hook

    model.model.register_forward_pre_hook(start, with_kwargs=True)
    for block, k in zip(fusion.blocks, chosen):
        layers[k].register_forward_pre_hook(before_layer(block), with_kwargs=True)
    return fusion
