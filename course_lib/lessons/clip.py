"""CLIP on the tiny world (notebook 09, section 1): its contrastive loss, and zero-shot classification."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from course_lib.world.backbones import TinyWorld


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

def clip_zero_shot(world: TinyWorld, n: int = 96, seed: int = 0) -> dict:
    """CLIP's first use (Radford et al. 2021, §3.1): classify images it was never trained to classify.

    The classes are the 12 objects (colour x shape); `n` fresh one-object scenes. Each class is a caption
    naming it, as the world's captions do; one prompt says "on the left", the ensemble averages the two
    sides' text embeddings (CLIP's prompt ensembling, §3.1.4); `with_side` picks among all 24 captions
    (object x side). Returns the accuracies and the ensemble's predictions.
    """
    import random

    from transformers import AutoProcessor, AutoTokenizer, CLIPModel

    from course_lib.world.scenes import COLORS, SHAPES, Obj, Scene, caption, render

    model = CLIPModel.from_pretrained(world.clip).eval()
    tok, image_processor = AutoTokenizer.from_pretrained(world.clip), AutoProcessor.from_pretrained(world.clip)
    classes = [(c, s) for c in COLORS for s in SHAPES]
    rng = random.Random(seed)
    truth = [rng.randrange(len(classes)) for _ in range(n)]
    scenes = [Scene((Obj(classes[k][1], classes[k][0], rng.randrange(4)),)) for k in truth]
    images = [render(s, 64, rng) for s in scenes]

    def embed_texts(cell: int) -> torch.Tensor:
        texts = [caption(Scene((Obj(s, c, cell),))) + "<|endoftext|>" for c, s in classes]
        batch = tok(texts, padding="max_length", max_length=32, truncation=True, return_tensors="pt")
        return torch.nn.functional.normalize(model.get_text_features(**batch).pooler_output, dim=-1)

    with torch.no_grad():
        pixels = image_processor(images=images, return_tensors="pt")["pixel_values"]
        image_emb = torch.nn.functional.normalize(model.get_image_features(pixel_values=pixels).pooler_output, dim=-1)
        left, right = embed_texts(0), embed_texts(1)
        ensemble = torch.nn.functional.normalize(left + right, dim=-1)
        one, both = (image_emb @ left.T).argmax(1), (image_emb @ ensemble.T).argmax(1)
        with_side = (image_emb @ torch.cat([left, right]).T).argmax(1)  # 24 classes: object x side
    truth_t = torch.tensor(truth)
    sides = torch.tensor([s.objects[0].cell % 2 for s in scenes])
    names = [f"{c} {s}" for c, s in classes]
    return {"images": images, "truth": [names[k] for k in truth], "predicted": [names[k] for k in both.tolist()],
            "one_prompt": (one == truth_t).float().mean().item(), "ensemble": (both == truth_t).float().mean().item(),
            "with_side": (with_side == truth_t + len(classes) * sides).float().mean().item(),
            "chance": 1 / len(classes), "n": n}

def plot_zero_shot(result: dict, k: int = 8) -> Figure:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, k, figsize=(1.6 * k, 2.1))
    for ax, image, truth, guess in zip(axes, result["images"], result["truth"], result["predicted"]):
        ax.imshow(image)
        ax.set_title(f"{guess}\n({truth})", fontsize=8, color="tab:green" if guess == truth else "tab:red")
        ax.axis("off")
    fig.suptitle("zero-shot: CLIP's best caption (the truth in brackets)", fontsize=9)
    fig.tight_layout()
    return fig
