"""Saving a LLaVA in the key layout of the hub's llava-hf checkpoints, which every reader loads.

transformers 5 keeps a Llava's parts under new names (`model.language_model.*`, `model.vision_tower.*` with
CLIP's `vision_model` level dropped, `lm_head.*`) and maps the old ones when it loads. What its
`save_pretrained` writes back depends on the version and the path: 5.23 writes CLIP's weights as
`vision_tower.embeddings.*`, and given a gathered ZeRO-3 state dict, the language model as
`language_model.model.model.*`. transformers 5.23 loads both; vLLM (which reads the llava-hf layout through
its own weight mapper) and older transformers load neither. So the course writes the layout of
llava-hf/llava-1.5-7b-hf itself:

    model.vision_tower.X          -> vision_tower.vision_model.X
    model.multi_modal_projector.X -> multi_modal_projector.X
    model.language_model.X        -> language_model.model.X
    lm_head.X                     -> language_model.lm_head.X
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    from transformers import LlavaForConditionalGeneration

HUB_PREFIXES = (("model.vision_tower.vision_model.", "vision_tower.vision_model."),
                ("model.vision_tower.", "vision_tower.vision_model."),
                ("model.multi_modal_projector.", "multi_modal_projector."),
                ("model.language_model.", "language_model.model."),
                ("lm_head.", "language_model.lm_head."))
INDEX = "model.safetensors.index.json"


def hub_name(name: str) -> str:
    """The llava-hf checkpoint key of a LlavaForConditionalGeneration state-dict key."""
    for new, hub in HUB_PREFIXES:
        if name.startswith(new):
            return hub + name[len(new):]
    raise ValueError(f"{name}: not a weight of a LlavaForConditionalGeneration")


def hub_layout(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state` under llava-hf's key names; a tensor shared by two names (tied embeddings) is kept once, under
    the first, as transformers does (the tie is in the config)."""
    out, seen = {}, set()
    for name, tensor in state.items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if tensor.numel() and key in seen:
            continue
        seen.add(key)
        out[hub_name(name)] = tensor
    return out


def save_llava(model: LlavaForConditionalGeneration, folder: str | Path,
               state_dict: dict[str, torch.Tensor] | None = None) -> None:
    """Write config.json, generation_config.json and the weights (safetensors, in 5 GB shards when larger, and
    an index) of `model` into `folder`, in the llava-hf layout. `state_dict` replaces the model's own, as
    in `save_pretrained` (a ZeRO-3 run passes the gathered one)."""
    from huggingface_hub import save_torch_state_dict

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = hub_layout(model.state_dict() if state_dict is None else state_dict)
    model.config.architectures = [type(model).__name__]
    # The weights' dtype, as save_pretrained records it: vLLM's and transformers' dtype="auto" read it.
    model.config.dtype = str(next(t.dtype for t in state.values() if t.is_floating_point())).split(".")[1]
    model.config.save_pretrained(folder)
    if model.can_generate() and model.generation_config is not None:
        model.generation_config.save_pretrained(folder)
    save_torch_state_dict(state, folder, metadata={"format": "pt"}, max_shard_size="5GB")
    if not (folder / INDEX).is_file():
        # An index for the single file too: vLLM loads every *.safetensors in a folder that has none, and the
        # course keeps projector.safetensors (the stage-1 projector alone) beside the model.
        index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in state.values())},
                 "weight_map": dict.fromkeys(sorted(state), "model.safetensors")}
        (folder / INDEX).write_text(json.dumps(index, indent=1))
