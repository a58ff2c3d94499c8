"""What trains in each stage: freezing, LoRA on the language model only, and the projector's own LR.

LLaVA's two-stage recipe (Liu et al., "Improved Baselines with Visual Instruction Tuning", 2023):
stage 1 (pretrain) trains only the projector on captions; stage 2 (finetune) trains on instructions
with one of three train types:

- `use_lora`: LoRA adapters on the language model's linear layers; the projector is trained in full
  through PEFT's `modules_to_save`, so it is saved with the adapter.
- `freeze_vision`: projector + the whole language model (and its LM head).
- `none` (alias `full`): everything, vision tower included.
- `partial_lora`: LoRA on the same layers that acts only at image-token positions (InternLM-XComposer2),
  plus the projector; text tokens keep the original weights (see course_lib.model.partial_lora).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import nn

from course_lib.model.lora import PROJECTOR, lora_config
from course_lib.model.partial_lora import apply_partial_lora
from course_lib.util.cli import UserError

if TYPE_CHECKING:
    from peft import PeftModel
    from transformers import LlavaForConditionalGeneration

TRAIN_TYPES = ("use_lora", "freeze_vision", "none", "partial_lora")
TRAIN_TYPE_ALIASES = {"full": "none"}


class TrainSetupError(UserError, ValueError):
    """A user-facing configuration problem (bad train type, missing stage-1 projector, ...)."""


def normalize_train_type(train_type: str) -> str:
    train_type = TRAIN_TYPE_ALIASES.get(train_type, train_type)
    if train_type not in TRAIN_TYPES:
        raise TrainSetupError(f"--train_type {train_type!r} is not one of use_lora, freeze_vision, none (or full), "
                              "partial_lora")
    return train_type


def _set_trainable(model: nn.Module, parts: tuple[str, ...]) -> None:
    for name, p in model.named_parameters():
        p.requires_grad = any(f"{part}." in name or name.startswith(part) for part in parts)


def prepare_model(model: LlavaForConditionalGeneration, stage: str, train_type: str = "use_lora", lora_r: int = 16,
                  lora_alpha: int = 32, lora_dropout: float = 0.05,
                  gradient_checkpointing: bool = False) -> LlavaForConditionalGeneration | PeftModel:
    """Freeze/unfreeze the parts of a LlavaForConditionalGeneration for `stage` and `train_type`.

    Returns the model to train: the same object, or a PEFT wrapper for `use_lora`.
    """
    if stage == "pretrain":
        _set_trainable(model, (PROJECTOR,))
        return model
    train_type = normalize_train_type(train_type)
    if train_type == "freeze_vision":
        _set_trainable(model, (PROJECTOR, "language_model", "lm_head"))
        return model
    if train_type == "none":
        _set_trainable(model, ("",))
        return model
    if train_type == "partial_lora":
        _set_trainable(model, (PROJECTOR,))
        if gradient_checkpointing:
            model.enable_input_require_grads()
        apply_partial_lora(model, lora_r, lora_alpha, lora_dropout)
        return model
    from peft import get_peft_model

    _set_trainable(model, ())
    if gradient_checkpointing:
        # Inputs of a frozen embedding carry no grad, so checkpointed LoRA layers would get none.
        model.enable_input_require_grads()
    return get_peft_model(model, lora_config(lora_r, lora_alpha, lora_dropout))


def optimizer_groups(model: nn.Module, lr: float, projector_lr: float | None, weight_decay: float) -> list[dict]:
    """Parameter groups: projector at its own LR (LLaVA's `mm_projector_lr`); no decay on biases/norms."""
    groups: dict[tuple[bool, bool], list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        is_proj = PROJECTOR in name and projector_lr is not None
        decay = p.ndim >= 2
        groups.setdefault((is_proj, decay), []).append(p)
    return [{"params": ps, "lr": projector_lr if is_proj else lr, "weight_decay": weight_decay if decay else 0.0}
            for (is_proj, decay), ps in groups.items()]
