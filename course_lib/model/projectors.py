"""Projectors: five ways to turn vision-tower features into LLM input tokens, each after a published design.

Every projector maps [images, patches, vision_dim] -> [images, tokens_out(patches), text_dim] and can
replace `model.model.multi_modal_projector` of a transformers Llava model for experiments
(`use_projector`). The course's default path stays the standard HF checkpoint with LLaVA-1.5's MLP.

| name | design | tokens per image |
|---|---|---|
| `linear` | LLaVA (Liu et al. 2023): one linear layer | patches |
| `mlp2x_gelu` | LLaVA-1.5 (Liu et al. 2023b): Linear-GELU-Linear, HF's `LlavaMultiModalProjector` | patches |
| `mlp_ln` | InternVL's `mlp1`: LayerNorm on the vision features first, then the MLP, for stable scales | patches |
| `pixel_shuffle` | InternVL 1.5 (Chen et al. 2024): each 2x2 block of patches is one token, LN + MLP | patches / 4 |
| `qformer` | BLIP-2's Q-Former (Li et al. 2023), reduced: N learned queries read the patches by cross-attention | N |

The Q-Former here is only the querying transformer used as a bridge (self-attention among the queries,
cross-attention to the image features, an MLP, per layer). BLIP-2 also pretrains it with three losses
(image-text contrastive, image-grounded text generation, image-text matching) through a BERT text branch;
that pretraining is not reproduced: here it is trained end to end with the language-model loss only.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from transformers import LlavaForConditionalGeneration, LlavaProcessor


class LinearProjector(nn.Module):
    def __init__(self, vision_dim: int, text_dim: int):
        super().__init__()
        self.linear = nn.Linear(vision_dim, text_dim)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear(features)

    def tokens_out(self, patches: int) -> int:
        return patches


class MLPProjector(nn.Module):
    """Linear-GELU-Linear; with `layer_norm=True` a LayerNorm on the input first (InternVL's mlp1)."""

    def __init__(self, vision_dim: int, text_dim: int, layer_norm: bool = False):
        super().__init__()
        self.norm = nn.LayerNorm(vision_dim) if layer_norm else nn.Identity()
        self.linear_1 = nn.Linear(vision_dim, text_dim)
        self.act = nn.GELU()
        self.linear_2 = nn.Linear(text_dim, text_dim)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(self.norm(features))))

    def tokens_out(self, patches: int) -> int:
        return patches


def pixel_shuffle(features: torch.Tensor, scale: int = 2) -> torch.Tensor:
    """[B, h*w, C] -> [B, (h/s)*(w/s), C*s*s]: each s x s block of neighbouring patches becomes one token.

    Token k of the output holds the patches of block k in row-major order, so the spatial layout is kept
    (InternVL's `pixel_shuffle` with downsample ratio 1/s; 1024 -> 256 tokens for a 448 px tile).
    Reference: https://github.com/OpenGVLab/InternVL, internvl_chat/internvl/model/internvl_chat/
    modeling_internvl_chat.py (`pixel_shuffle`, `mlp1`); nanoVLM's models/modality_projector.py does the same.
    """
    b, n, c = features.shape
    side = math.isqrt(n)
    if side * side != n or side % scale:
        raise ValueError(f"pixel_shuffle: {n} patches is not a square grid divisible by {scale}")
    x = features.reshape(b, side // scale, scale, side // scale, scale, c)  # rows: block, within; cols: same
    x = x.permute(0, 1, 3, 2, 4, 5)  # [B, block row, block col, within row, within col, C]
    return x.reshape(b, (side // scale) ** 2, scale * scale * c)


class PixelShuffleProjector(nn.Module):
    def __init__(self, vision_dim: int, text_dim: int, scale: int = 2):
        super().__init__()
        self.scale = scale
        self.mlp = MLPProjector(vision_dim * scale * scale, text_dim, layer_norm=True)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.mlp(pixel_shuffle(features, self.scale))

    def tokens_out(self, patches: int) -> int:
        return patches // (self.scale * self.scale)


class QFormerLayer(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.norm_self, self.norm_cross, self.norm_mlp = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.self_attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.cross_attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, queries: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        q = self.norm_self(queries)
        queries = queries + self.self_attn(q, q, q, need_weights=False)[0]
        queries = queries + self.cross_attn(self.norm_cross(queries), image, image, need_weights=False)[0]
        return queries + self.mlp(self.norm_mlp(queries))


class QFormerProjector(nn.Module):
    """N learned queries; each layer: self-attention, cross-attention to the patches, MLP (pre-norm)."""

    def __init__(self, vision_dim: int, text_dim: int, num_queries: int = 8, num_layers: int = 2, heads: int = 4):
        super().__init__()
        self.queries = nn.Parameter(torch.randn(1, num_queries, vision_dim) * 0.02)
        self.layers = nn.ModuleList(QFormerLayer(vision_dim, heads) for _ in range(num_layers))
        self.norm = nn.LayerNorm(vision_dim)
        self.out = nn.Linear(vision_dim, text_dim)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        queries = self.queries.expand(features.shape[0], -1, -1).to(features.dtype)
        for layer in self.layers:
            queries = layer(queries, features)
        return self.out(self.norm(queries))

    def tokens_out(self, patches: int) -> int:
        return self.queries.shape[1]


PROJECTORS = {
    "linear": LinearProjector,
    "mlp2x_gelu": MLPProjector,
    "mlp_ln": lambda v, t: MLPProjector(v, t, layer_norm=True),
    "pixel_shuffle": PixelShuffleProjector,
    "qformer": QFormerProjector,
}


def make_projector(name: str, vision_dim: int, text_dim: int, **kwargs) -> nn.Module:
    if name not in PROJECTORS:
        raise ValueError(f"unknown projector {name!r}; expected one of {sorted(PROJECTORS)}")
    return PROJECTORS[name](vision_dim, text_dim, **kwargs)


def use_projector(model: LlavaForConditionalGeneration, processor: LlavaProcessor, name: str, seed: int = 0,
                  **kwargs) -> nn.Module:
    """Put projector `name` into a Llava model in place of its MLP; make `<image>` expand to its tokens.

    The course's data pipeline (`PromptEncoder`, `image_token_count`) reads `processor.image_seq_length`,
    so setting it keeps prompts and image features the same length. Experiments only: a model with a
    non-standard projector does not load back with `LlavaForConditionalGeneration.from_pretrained`.
    """
    from course_lib.data.image_tokens import image_size

    vision = model.config.vision_config
    text_dim = model.config.text_config.hidden_size
    torch.manual_seed(seed)
    projector = make_projector(name, vision.hidden_size, text_dim, **kwargs)
    old = model.model.multi_modal_projector
    param = next(old.parameters())
    model.model.multi_modal_projector = projector.to(param.device, param.dtype)
    height, width = image_size(processor)
    patches = (height // vision.patch_size) * (width // vision.patch_size)
    processor.image_seq_length = projector.tokens_out(patches)
    return projector
