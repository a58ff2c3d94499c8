"""Partial LoRA (InternLM-XComposer2, Dong et al. 2024): LoRA that acts only on image-token positions.

Plain LoRA changes how the language model treats every token, text included, which is how instruction
tuning can erode a model's text skills. XComposer2's Partial LoRA adds the low-rank update only where the
input is an image token, so text tokens go through the original weights untouched:

    y = W x + mask * (B A x) * alpha / r,   mask = 1 at `<image>` positions, else 0

Here the adapters sit beside the language model's linear layers (the same targets as `use_lora`) as
forward hooks, and a pre-hook on `model.model` reads `input_ids` to set the mask for each forward pass. In
generation the prompt's image tokens get the update; each new token is text and does not. The model's own
weights keep their names, so a trained model saves as a standard Llava checkpoint plus
`partial_lora.safetensors` + `partial_lora.json` (`save_partial_lora` / `load_partial_lora`). It cannot be
merged into the weights: the update depends on the position.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from course_lib.model.lora import LORA_TARGETS

if TYPE_CHECKING:
    from transformers import LlavaForConditionalGeneration

WEIGHTS, CONFIG = "partial_lora.safetensors", "partial_lora.json"
ATTR = "partial_lora"  # the ModuleDict on the Llava model that holds the adapters


class LoRAPair(nn.Module):
    def __init__(self, in_features: int, out_features: int, r: int, alpha: float, dropout: float):
        super().__init__()
        self.lora_A = nn.Linear(in_features, r, bias=False)
        self.lora_B = nn.Linear(r, out_features, bias=False)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # as PEFT: A random, B zero
        nn.init.zeros_(self.lora_B.weight)
        self.dropout = nn.Dropout(dropout)
        self.scaling = alpha / r

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lora_B(self.lora_A(self.dropout(x))) * self.scaling


class _Mask:
    """The current forward pass's image-token mask [batch, tokens], shared by every adapter."""

    value: torch.Tensor | None = None


def apply_partial_lora(model: LlavaForConditionalGeneration, r: int = 16, alpha: float = 32,
                       dropout: float = 0.05) -> nn.ModuleDict:
    """Add Partial LoRA adapters to a LlavaForConditionalGeneration (in place); returns them."""
    if hasattr(model, ATTR):
        raise ValueError("the model already has Partial LoRA adapters")
    image_token_id = model.config.image_token_id
    mask = _Mask()
    adapters = nn.ModuleDict()
    pattern = re.compile(LORA_TARGETS)
    for name, module in model.named_modules():
        if not (isinstance(module, nn.Linear) and pattern.fullmatch(name)):
            continue
        ref = next(module.parameters())
        pair = LoRAPair(module.in_features, module.out_features, r, alpha, dropout).to(ref.device, ref.dtype)
        adapters[name.replace(".", "__")] = pair

        def add_update(mod, inputs, output, pair=pair):
            m = mask.value
            if m is None or m.shape != output.shape[:-1]:
                return output  # no input_ids seen for this pass
            # Multiplied, not skipped when the mask is all zero: `m.any()` would sync the GPU in every layer.
            return output + pair(inputs[0]) * m.unsqueeze(-1).to(output.dtype)

        module.register_forward_hook(add_update)
    if not adapters:
        raise ValueError("no language-model linear layers matched the LoRA targets")

    def set_mask(mod, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        mask.value = None if ids is None else ids == image_token_id

    model.model.register_forward_pre_hook(set_mask, with_kwargs=True)
    setattr(model, ATTR, adapters)
    for p in adapters.parameters():
        p.requires_grad = True
    model.partial_lora_config = {"r": r, "alpha": alpha, "dropout": dropout}
    return adapters


def save_partial_lora(model: LlavaForConditionalGeneration, folder: str | Path) -> None:
    from safetensors.torch import save_file

    folder = Path(folder)
    state = {k: v.detach().float().cpu().contiguous() for k, v in getattr(model, ATTR).state_dict().items()}
    save_file(state, str(folder / WEIGHTS), metadata={"format": "pt"})
    (folder / CONFIG).write_text(json.dumps(model.partial_lora_config, indent=1))


def has_partial_lora(folder: str | Path) -> bool:
    return (Path(folder) / CONFIG).is_file()


def load_partial_lora(model: LlavaForConditionalGeneration, folder: str | Path) -> None:
    """Add the adapters saved in `folder` to a freshly loaded Llava model; strict: every tensor must match."""
    from safetensors.torch import load_file

    folder = Path(folder)
    config = json.loads((folder / CONFIG).read_text())
    adapters = apply_partial_lora(model, config["r"], config["alpha"], config.get("dropout", 0.0))
    ref = next(model.parameters())
    adapters.load_state_dict({k: v.to(ref.device, ref.dtype) for k, v in load_file(folder / WEIGHTS).items()},
                             strict=True)
