"""The Trainer, taught LLaVA's habits: the projector's own learning rate, length grouping from lengths
known up front (with LLaVA's modality grouping), and a resume that really loads the weights."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from course_lib.model.partial_lora import ATTR as PARTIAL_LORA_ATTR
from course_lib.training.arguments import ModelArguments, attn_implementation
from course_lib.training.trainable import optimizer_groups
from course_lib.training.zero import whole_parameters

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from peft import PeftModel
    from transformers import LlavaForConditionalGeneration, ProcessorMixin, Trainer, TrainingArguments

    from course_lib.data.dataset import LlavaDataset


def load_processor(margs: ModelArguments) -> ProcessorMixin:
    """The processor alone: seconds, so the data can be checked before the model's minutes of loading."""
    if margs.model_name_or_path == "tiny":
        from course_lib.build import build_llava

        return build_llava("tiny", "tiny")[1]
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(os.path.abspath(margs.model_name_or_path))


def load_model(margs: ModelArguments, dtype: torch.dtype) -> LlavaForConditionalGeneration:
    """The model to train, with the stage-1 projector loaded when one is given."""
    from safetensors.torch import load_file
    from transformers import LlavaForConditionalGeneration

    if margs.model_name_or_path == "tiny":
        from course_lib.build import build_llava

        model = build_llava("tiny", "tiny")[0].to(dtype)
    else:
        path = os.path.abspath(margs.model_name_or_path)  # absolute, so a LoRA adapter finds its base
        model = LlavaForConditionalGeneration.from_pretrained(
            path, dtype=dtype, attn_implementation=attn_implementation(margs.attn_implementation))
    if margs.pretrain_projector:
        state = load_file(margs.pretrain_projector)
        projector = model.model.multi_modal_projector
        with whole_parameters(projector.parameters(), modify=True):
            projector.load_state_dict(state, strict=True)
    return model


@contextmanager
def vision_kept_in_graph(model: torch.nn.Module) -> Iterator[None]:
    """Run a text-only batch with the vision tower and projector still in the autograd graph.

    Without images they get no gradient on this rank, while the ranks that had images do. ZeRO's gradient
    reduce-scatter then mismatches across ranks (gloo: "Received data size doesn't match expected size";
    NCCL hangs). LLaVA keeps them in the graph by encoding a blank image and splicing in a zero-length
    slice of its features. Here a blank image is encoded and `0 x` its features is added to the token
    embeddings. The vision weights then get exact zero gradients, in the same backward order as on an image
    batch, which ZeRO's gradient buckets need too.
    """
    llava = model.get_base_model() if hasattr(model, "get_base_model") else model
    vision = llava.config.vision_config
    embed = llava.get_input_embeddings()
    tower = llava.model.vision_tower

    def add_zero_image(module, args, output):
        blank = torch.zeros(1, vision.num_channels, vision.image_size, vision.image_size,
                            dtype=next(tower.parameters()).dtype, device=output.device)
        features = llava.model.get_image_features(  # the projected features, one tensor per image
            pixel_values=blank, vision_feature_layer=llava.config.vision_feature_layer,
            vision_feature_select_strategy=llava.config.vision_feature_select_strategy).pooler_output
        return output + 0.0 * sum(f.sum() for f in features).to(output.dtype)

    handle = embed.register_forward_hook(add_zero_image)
    try:
        yield
    finally:
        handle.remove()


def make_trainer(model: LlavaForConditionalGeneration | PeftModel, targs: TrainingArguments, dataset: LlavaDataset,
                 collator: Callable[[Sequence[dict]], dict], projector_lr: float | None, callbacks: list | None,
                 group_by_modality: bool = False, eval_dataset: LlavaDataset | None = None) -> Trainer:
    from transformers import Trainer

    class LlavaTrainer(Trainer):
        """Trainer with LLaVA's projector learning rate and length grouping from precomputed lengths."""

        def create_optimizer(self, model: torch.nn.Module | None = None) -> torch.optim.Optimizer:
            if self.optimizer is None:
                cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(self.args, self.model)
                kwargs.pop("lr", None)
                groups = optimizer_groups(self.model, self.args.learning_rate, projector_lr, self.args.weight_decay)
                self.optimizer = cls(groups, lr=self.args.learning_rate, **kwargs)
            return self.optimizer

        def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
            # transformers 5 saves Llava checkpoints under the legacy key names (`language_model.model.*`)
            # but the Trainer's resume loads them non-strictly under the new ones: nothing matches and
            # the run silently continues from the old weights. from_pretrained applies the key mapping.
            model = model or self.model
            if hasattr(model, "peft_config") or self.is_deepspeed_enabled:
                return super()._load_from_checkpoint(resume_from_checkpoint, model)
            loaded = type(model).from_pretrained(resume_from_checkpoint, dtype=model.dtype)
            state = loaded.state_dict()
            if hasattr(model, PARTIAL_LORA_ATTR):  # the checkpoint holds the adapters under their own names
                from safetensors.torch import load_file

                for f in Path(resume_from_checkpoint).glob("*.safetensors"):
                    state.update({k: v for k, v in load_file(f).items() if k.startswith(PARTIAL_LORA_ATTR + ".")})
            model.load_state_dict(state, strict=True)

        def compute_loss(self, model, inputs, *args, **kwargs):
            if inputs.get("pixel_values") is not None:
                return super().compute_loss(model, inputs, *args, **kwargs)
            with vision_kept_in_graph(self.accelerator.unwrap_model(model)):
                return super().compute_loss(model, inputs, *args, **kwargs)

        def _get_train_sampler(self, *args, **kwargs):
            # Lengths are known without opening images, so ours replaces transformers' LengthGroupedSampler,
            # which would measure them; ours also has LLaVA's modality grouping (`--group_by_modality_length`).
            # The batch is the global one: each step's ranks then get samples of similar length.
            if group_by_modality or self.args.train_sampling_strategy == "group_by_length":
                from course_lib.data.sampler import LengthGroupedSampler

                lengths = dataset.modality_lengths if group_by_modality else dataset.lengths
                return LengthGroupedSampler(lengths, self.args.per_device_train_batch_size * self.args.world_size,
                                            seed=self.args.seed, group_by_modality=group_by_modality)
            return super()._get_train_sampler(*args, **kwargs)

    return LlavaTrainer(model=model, args=targs, train_dataset=dataset, eval_dataset=eval_dataset,
                        data_collator=collator, callbacks=callbacks)


