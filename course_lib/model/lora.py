"""Where LoRA goes: the language model's linear layers, never the vision tower's.

LLaVA-1.5's LoRA recipe (haotian-liu/LLaVA, scripts/v1_5/finetune_lora.sh: r 128, alpha 256) targets
every linear layer of the language model; the course defaults to r 16, alpha 32 for the tiny world.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from peft import LoraConfig

# Anchored on `language_model`: plain q_proj/k_proj/v_proj names also match CLIP's attention layers,
# which would silently put adapters into the "frozen" vision tower.
LORA_TARGETS = r".*\.language_model\..*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
PROJECTOR = "multi_modal_projector"


def lora_config(r: int = 16, alpha: int = 32, dropout: float = 0.05) -> LoraConfig:
    """PEFT's LoraConfig for stage 2's `use_lora`: the projector trains in full (`modules_to_save`),
    so it is saved with the adapter."""
    from peft import LoraConfig

    return LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=LORA_TARGETS,
                      modules_to_save=[PROJECTOR], bias="none")
