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


def answer_accuracy(model: LlavaForConditionalGeneration | PeftModel, dataset: LlavaDataset, types: dict[str, str],
                    batch_size: int = 32) -> dict:
    """Teacher-forced exact match, overall and per question type (`types`: sample id -> type)."""
    collator = PaddedCollator(dataset.processor.tokenizer.pad_token_id)
    hits: dict[str, list[bool]] = defaultdict(list)
    model.eval()
    with torch.no_grad():
        for start in range(0, len(dataset), batch_size):
            items = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
            batch = collator(items)
            logits = model(**batch).logits[:, :-1]
            labels = batch["labels"][:, 1:]
            correct = ((logits.argmax(-1) == labels) | (labels == IGNORE_INDEX)).all(1)
            for k, ok in zip(range(start, start + len(items)), correct.tolist()):
                hits[types[dataset.samples[k].id]].append(ok)
    by_type = {t: sum(v) / len(v) for t, v in sorted(hits.items())}
    every = [x for v in hits.values() for x in v]
    return {"accuracy": sum(every) / len(every), "by_type": by_type, "n": len(every)}


def projector_run(world: TinyWorld, name: str = "mlp2x_gelu", steps: int = 150, batch_size: int = 16, lr: float = 5e-4,
                  projector_lr: float = 1e-3, seed: int = 0, eval_limit: int | None = None,
                  train_type: str = "freeze_vision", **kwargs) -> dict:
    """Train one design (projector `name`, `train_type`) for `steps` and score it: a row for the table."""
    model, processor = build_llava(str(world.clip), str(world.llm), seed=seed)
    projector = use_projector(model, processor, name, seed=seed, **kwargs)
    torch.manual_seed(seed)  # LoRA's random init
    model = prepare_model(model, "finetune", train_type)
    model.config.text_config.use_cache = False
    train = LlavaDataset(world.data / "instruct" / "instruct.json", processor, template="chat")
    evalset = LlavaDataset(world.data / "eval" / "eval.json", processor, template="chat")
    if eval_limit:
        for attr in ("samples", "lengths", "image_counts", "tile_counts"):
            setattr(evalset, attr, getattr(evalset, attr)[:eval_limit])
    types = {r["id"]: r["type"] for r in json.loads((world.data / "eval" / "eval.json").read_text())}
    collator = PaddedCollator(processor.tokenizer.pad_token_id)
    optimizer = torch.optim.AdamW(optimizer_groups(model, lr, projector_lr, 0.0))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 10))
    batches = _batches(train, batch_size, torch.Generator().manual_seed(seed))
    model.train()
    losses, seconds = [], []
    for _ in range(steps):
        batch = collator(next(batches))
        start = time.perf_counter()
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        seconds.append(time.perf_counter() - start)
        losses.append(loss.item())
    scores = answer_accuracy(model, evalset, types)
    trainable = next(row["trainable"] for row in param_table(model) if row["module"] == "total")
    return {"projector": name, "train_type": train_type, "tokens_per_image": processor.image_seq_length,
            "projector_params": sum(p.numel() for p in projector.parameters()),
            "trainable_params": trainable, "step_seconds": statistics.median(seconds),
            "first_loss": statistics.mean(losses[:10]), "last_loss": statistics.mean(losses[-10:]),
            "losses": losses, **scores}


def format_runs(runs: list[dict], label: str = "projector") -> str:
    """A markdown table: tokens per image, parameters, step time, held-out accuracy per type."""
    types = sorted({t for r in runs for t in r["by_type"]})
    header = [label, "tokens/image", "projector params", "trainable params", "step s", "loss first→last", "accuracy",
              *types]
    body = [[r[label], str(r["tokens_per_image"]), f"{r['projector_params']:,}", f"{r['trainable_params']:,}",
             f"{r['step_seconds']:.3f}", f"{r['first_loss']:.2f}→{r['last_loss']:.2f}", f"{r['accuracy']:.1%}",
             *(f"{r['by_type'].get(t, 0):.0%}" for t in types)] for r in runs]
    return render_table(header, body, markdown=True)


def clip_similarity(world: TinyWorld, n: int = 12) -> dict:
    """The tiny CLIP on `n` pretrain pairs: the image-text similarity matrix and its contrastive loss.

    CLIP (Radford et al. 2021) scores every image against every caption of a batch; the loss is the
    cross-entropy of picking the right caption for each image and the right image for each caption,
    averaged (InfoNCE, symmetric). A trained CLIP puts its largest values on the diagonal.
    """
    from PIL import Image
    from transformers import AutoProcessor, AutoTokenizer, CLIPModel

    model = CLIPModel.from_pretrained(world.clip).eval()
    tok = AutoTokenizer.from_pretrained(world.clip)
    image_processor = AutoProcessor.from_pretrained(world.clip)
    records = json.loads((world.data / "pretrain" / "chat.json").read_text())[:n]
    images = [Image.open(world.data / "pretrain" / "images_dl" / r["image"]).convert("RGB") for r in records]
    captions = [r["conversations"][1]["value"] for r in records]
    text = tok([c + "<|endoftext|>" for c in captions], padding="max_length", max_length=32, truncation=True,
               return_tensors="pt")
    pixels = image_processor(images=images, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        out = model(pixel_values=pixels, input_ids=text["input_ids"], attention_mask=text["attention_mask"],
                    return_loss=True)
    logits = out.logits_per_image  # [images, texts], already scaled by CLIP's learned temperature
    return {"images": images, "captions": captions, "logits": logits, "loss": out.loss.item(),
            "image_to_text": (logits.argmax(1) == torch.arange(n)).float().mean().item(),
            "text_to_image": (logits.argmax(0) == torch.arange(n)).float().mean().item()}


def plot_similarity(result: dict) -> Figure:
    import matplotlib.pyplot as plt

    n = len(result["captions"])
    fig, axes = plt.subplots(1, 2, figsize=(12, 5), gridspec_kw={"width_ratios": [1, 2.2]})
    for k, img in enumerate(result["images"][:4]):
        axes[0].imshow(img, extent=(k * 64, (k + 1) * 64, 0, 64))
    axes[0].set_xlim(0, 4 * 64)
    axes[0].set_title("images 0-3", fontsize=9)
    axes[0].axis("off")
    im = axes[1].imshow(result["logits"].numpy(), cmap="viridis")
    axes[1].set_yticks(range(n), [f"image {k}" for k in range(n)], fontsize=7)
    axes[1].set_xticks(range(n), [f"{k}: {c[:28]}" for k, c in enumerate(result["captions"])], rotation=75,
                       ha="right", fontsize=7)
    axes[1].set_title(f"image-caption similarity (loss {result['loss']:.2f}, image->text "
                      f"{result['image_to_text']:.0%}, text->image {result['text_to_image']:.0%})", fontsize=9)
    fig.colorbar(im, ax=axes[1], fraction=0.03)
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
