"""Design-pattern experiments on the tiny world (notebook 09): projectors trained for the same budget.

Each run starts from the same empty tiny LLaVA, swaps in a projector (`projectors.use_projector`), and
trains projector + language model (vision frozen, as `freeze_vision`) on the instruct set for a fixed
number of steps in this process, then scores the held-out questions.

Scoring is teacher-forced exact match: an answer counts when the model's top token is right at every
answer position, `<|im_end|>` included. That is exactly the condition for greedy decoding to produce the
answer and stop, so it equals greedy exact match on the raw answer text, in one forward pass per batch.
"""

from __future__ import annotations

import json
import statistics
import time
from collections import defaultdict
from typing import TYPE_CHECKING

import torch

from course_lib.build import build_llava
from course_lib.data.collators import PaddedCollator
from course_lib.data.dataset import LlavaDataset
from course_lib.data.labels import IGNORE_INDEX
from course_lib.model.parameters import param_table
from course_lib.model.projectors import use_projector
from course_lib.training.trainable import optimizer_groups, prepare_model
from course_lib.util.tables import render_table

if TYPE_CHECKING:
    from collections.abc import Callable

    from matplotlib.figure import Figure
    from peft import PeftModel
    from PIL import Image
    from transformers import LlavaForConditionalGeneration

    from course_lib.world.backbones import TinyWorld


def _batches(dataset, batch_size: int, generator: torch.Generator):
    while True:
        for idx in torch.randperm(len(dataset), generator=generator).split(batch_size):
            if len(idx) == batch_size:
                yield [dataset[i] for i in idx.tolist()]


def held_out_batches(dataset: LlavaDataset, batch_size: int):
    """(first index, padded batch) over `dataset` in order: every sample once, the last batch possibly short."""
    collator = PaddedCollator(dataset.processor.tokenizer.pad_token_id)
    for start in range(0, len(dataset), batch_size):
        yield start, collator([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])


def answer_accuracy(model: LlavaForConditionalGeneration | PeftModel, dataset: LlavaDataset, types: dict[str, str],
                    batch_size: int = 32, blank_images: bool = False) -> dict:
    """Teacher-forced exact match, overall and per question type (`types`: sample id -> type).

    `blank_images`: every image is replaced by a black one (zero pixel values after normalisation): what
    the model answers from the question alone, the "blind" baseline that tells using the image from guessing.
    """
    hits: dict[str, list[bool]] = defaultdict(list)
    model.eval()
    with torch.no_grad():
        for start, batch in held_out_batches(dataset, batch_size):
            if blank_images and batch.get("pixel_values") is not None:
                batch["pixel_values"] = torch.zeros_like(batch["pixel_values"])
            logits = model(**batch).logits[:, :-1]
            labels = batch["labels"][:, 1:]
            correct = ((logits.argmax(-1) == labels) | (labels == IGNORE_INDEX)).all(1)
            for k, ok in zip(range(start, start + len(correct)), correct.tolist()):
                hits[types[dataset.samples[k].id]].append(ok)
    by_type = {t: sum(v) / len(v) for t, v in sorted(hits.items())}
    every = [x for v in hits.values() for x in v]
    return {"accuracy": sum(every) / len(every), "by_type": by_type, "n": len(every)}


def eval_loss(model: LlavaForConditionalGeneration | PeftModel, dataset: LlavaDataset, batch_size: int = 32) -> float:
    """Mean loss per answer token on `dataset` (the validation loss), in eval mode, without gradients."""
    was_training, total, tokens = model.training, 0.0, 0
    model.eval()
    with torch.no_grad():
        for _, batch in held_out_batches(dataset, batch_size):
            n = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
            total, tokens = total + model(**batch).loss.item() * n, tokens + n
    model.train(was_training)
    return total / tokens


def train_steps(model: LlavaForConditionalGeneration | PeftModel, train, pad_token_id: int, steps: int,
                batch_size: int = 16,
                lr: float = 5e-4, projector_lr: float = 1e-3, seed: int = 0,
                validate: Callable[[], float] | None = None, every: int = 0) -> dict:
    """AdamW for `steps` batches of `train` (10-step warm-up); `validate()` every `every` steps and at the end.

    Returns the losses, the median step time and the validation curve [(step, loss)].
    """
    collator = PaddedCollator(pad_token_id)
    optimizer = torch.optim.AdamW(optimizer_groups(model, lr, projector_lr, 0.0))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 10))
    batches = _batches(train, batch_size, torch.Generator().manual_seed(seed))
    model.train()
    losses, seconds = [], []
    curve = [(0, validate())] if validate and every else []  # where the curve starts: the untrained loss
    for step in range(1, steps + 1):
        batch = collator(next(batches))
        start = time.perf_counter()
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        seconds.append(time.perf_counter() - start)
        losses.append(loss.item())
        if validate and (step == steps or (every and step % every == 0)):
            curve.append((step, validate()))
    return {"losses": losses, "step_seconds": statistics.median(seconds) if seconds else 0.0, "validation": curve}


def tiny_sets(world: TinyWorld, processor) -> tuple[LlavaDataset, LlavaDataset, dict]:
    """The instruct set, the held-out set and the held-out question types."""
    train = LlavaDataset(world.data / "instruct" / "instruct.json", processor, template="chat")
    evalset = LlavaDataset(world.data / "eval" / "eval.json", processor, template="chat")
    types = {r["id"]: r["type"] for r in json.loads((world.data / "eval" / "eval.json").read_text())}
    return train, evalset, types


def projector_run(world: TinyWorld, name: str = "mlp2x_gelu", steps: int = 150, batch_size: int = 16, lr: float = 5e-4,
                  projector_lr: float = 1e-3, seed: int = 0, train_type: str = "freeze_vision",
                  feature_layer: int = -2, **kwargs) -> dict:
    """Train one design (projector `name`, `train_type`, CLIP layer `feature_layer`) for `steps`; a table row."""
    model, processor = build_llava(str(world.clip), str(world.llm), seed=seed)
    model.config.vision_feature_layer = feature_layer
    projector = use_projector(model, processor, name, seed=seed, **kwargs)
    torch.manual_seed(seed)  # LoRA's random init
    model = prepare_model(model, "finetune", train_type)
    model.config.text_config.use_cache = False
    train, evalset, types = tiny_sets(world, processor)
    run = train_steps(model, train, processor.tokenizer.pad_token_id, steps, batch_size, lr, projector_lr, seed)
    scores = answer_accuracy(model, evalset, types)
    trainable = next(row["trainable"] for row in param_table(model) if row["module"] == "total")
    losses = run["losses"]
    return {"projector": name, "train_type": train_type, "feature_layer": feature_layer,
            "tokens_per_image": processor.image_seq_length,
            "projector_params": sum(p.numel() for p in projector.parameters()),
            "trainable_params": trainable, "step_seconds": run["step_seconds"],
            "first_loss": statistics.mean(losses[:10]), "last_loss": statistics.mean(losses[-10:]),
            "losses": losses, **scores}


def text_logits(model, dataset: LlavaDataset, ids: list[str]) -> torch.Tensor:
    """Logits of the text-only samples `ids` (padded together), for comparing a model before and after."""
    index = {sample.id: k for k, sample in enumerate(dataset.samples)}
    batch = PaddedCollator(dataset.processor.tokenizer.pad_token_id)([dataset[index[i]] for i in ids])
    model.eval()
    with torch.no_grad():
        return model(**batch).logits * batch["attention_mask"][..., None]


def fusion_run(world: TinyWorld, fusion: str = "splice", steps: int = 100, batch_size: int = 16,
               projector_lr: float = 1e-3, seed: int = 0, **kwargs) -> dict:
    """Splicing (LLaVA's MLP) or gated cross-attention (Flamingo), the language model frozen in both.

    Only the new weights train (the projector, or the cross-attention blocks and the tag embedding: both sit
    in the projector's place, so stage `pretrain` trains exactly them). The row also says how far the
    text-only logits moved: the held-out text questions, before and after training.
    """
    from course_lib.model.cross_attention import use_cross_attention

    model, processor = build_llava(str(world.clip), str(world.llm), seed=seed)
    new = (use_cross_attention(model, processor, seed=seed, **kwargs) if fusion == "cross_attention"
           else use_projector(model, processor, "mlp2x_gelu", seed=seed))
    model = prepare_model(model, "pretrain")
    model.config.text_config.use_cache = False
    train, evalset, types = tiny_sets(world, processor)
    text_ids = [i for i, t in types.items() if t == "text"]
    before = text_logits(model, evalset, text_ids)
    run = train_steps(model, train, processor.tokenizer.pad_token_id, steps, batch_size, projector_lr,
                      projector_lr, seed)
    change = (text_logits(model, evalset, text_ids) - before).abs().max().item()
    scores = answer_accuracy(model, evalset, types)
    losses = run["losses"]
    return {"fusion": fusion, "tokens_per_image": processor.image_seq_length,
            "projector_params": sum(p.numel() for p in new.parameters()),
            "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "step_seconds": run["step_seconds"], "first_loss": statistics.mean(losses[:10]),
            "last_loss": statistics.mean(losses[-10:]), "losses": losses, "text_logit_change": change,
            "text_questions": len(text_ids), **scores}


def format_runs(runs: list[dict], label: str = "projector") -> str:
    """A markdown table: tokens per image, parameters, step time, held-out accuracy per type."""
    types = sorted({t for r in runs for t in r["by_type"]})
    header = [label, "tokens/image", "projector params", "trainable params", "step s", "loss first→last", "accuracy",
              *types]
    body = [[r[label], str(r["tokens_per_image"]), f"{r['projector_params']:,}", f"{r['trainable_params']:,}",
             f"{r['step_seconds']:.3f}", f"{r['first_loss']:.2f}→{r['last_loss']:.2f}", f"{r['accuracy']:.1%}",
             *(f"{r['by_type'].get(t, 0):.0%}" for t in types)] for r in runs]
    return render_table(header, body, markdown=True)


def qformer_masks(queries: int = 4, text: int = 5) -> dict[str, torch.Tensor]:
    """BLIP-2's three self-attention masks over [queries | text] (Li et al. 2023, Fig. 2): row attends to column.

    - ITC (image-text contrastive): uni-modal; queries see queries, text sees text, so neither leaks into
      the other before their embeddings are compared.
    - ITG (image-grounded text generation): multimodal causal; queries see only queries, each text token sees
      every query and the text before it, so the text must be written from what the queries extracted.
    - ITM (image-text matching): bi-directional; everything sees everything, for a match / no-match verdict.
    """
    n = queries + text
    is_query = torch.arange(n) < queries
    same = is_query[:, None] == is_query[None, :]
    causal_text = torch.ones(n, n, dtype=torch.bool).tril() | is_query[None, :]
    return {"ITC": same, "ITG": torch.where(is_query[:, None], is_query[None, :], causal_text),
            "ITM": torch.ones(n, n, dtype=torch.bool)}


def plot_qformer_masks(masks: dict[str, torch.Tensor], queries: int) -> Figure:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(masks), figsize=(3.6 * len(masks), 3.4))
    for ax, (name, mask) in zip(axes, masks.items()):
        n = mask.shape[0]
        ax.imshow(mask.numpy(), cmap="Blues", vmin=0, vmax=1.3)
        labels = [f"Q{k}" for k in range(queries)] + [f"T{k}" for k in range(n - queries)]
        ax.set_xticks(range(n), labels, fontsize=7)
        ax.set_yticks(range(n), labels, fontsize=7)
        ax.axhline(queries - 0.5, color="tab:red", lw=1)
        ax.axvline(queries - 0.5, color="tab:red", lw=1)
        ax.set_title(name, fontsize=10)
    fig.suptitle("BLIP-2's Q-Former: which position (row) attends to which (column); Q = query, T = text", fontsize=9)
    fig.tight_layout()
    return fig


def plot_runs(runs: list[dict]) -> Figure:
    """Loss curves and accuracy of the projector runs."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.5))
    for r in runs:
        smooth = [statistics.mean(r["losses"][max(0, k - 9):k + 1]) for k in range(len(r["losses"]))]
        axes[0].plot(smooth, label=f"{r['projector']} ({r['tokens_per_image']} tok)")
    axes[0].set(xlabel="step", ylabel="loss (10-step mean)", title="training loss")
    axes[0].legend(fontsize=8)
    axes[1].bar([r["projector"] for r in runs], [r["accuracy"] for r in runs], color="tab:blue")
    axes[1].set(ylabel="held-out exact match", ylim=(0, 1), title="accuracy after the same budget")
    axes[1].tick_params(axis="x", labelsize=8)
    fig.tight_layout()
    return fig


def demo_photo(width: int = 800, height: int = 1300, seed: int = 3) -> Image.Image:
    """A large "photo" for the tiling pictures: a sky gradient with tiny-world scenes pasted at several scales."""
    import random

    from PIL import Image, ImageFilter

    from course_lib.world.scenes import random_scene, render

    ramp = Image.linear_gradient("L").resize((width, height))
    photo = Image.merge("RGB", [ramp.point(lambda v: 120 + v // 3), ramp.point(lambda v: 160 + v // 4),
                                Image.new("L", (width, height), 230)])
    rng = random.Random(seed)
    for fx, fy, fs in [(0.05, 0.05, 0.37), (0.52, 0.15, 0.42), (0.1, 0.4, 0.52), (0.38, 0.75, 0.32)]:
        side = int(fs * width)
        scene = render(random_scene(rng), 64, rng).resize((side, side), Image.Resampling.NEAREST)
        photo.paste(scene, (int(fx * width), int(fy * height)))
    return photo.filter(ImageFilter.GaussianBlur(1))
