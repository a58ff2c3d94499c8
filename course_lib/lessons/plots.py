"""Figures for the notebooks (matplotlib). Each function returns its Figure so tests can save it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib

matplotlib.use(matplotlib.get_backend() if "inline" in matplotlib.get_backend() else "Agg")
import matplotlib.pyplot as plt  # noqa: E402
from PIL import Image  # noqa: E402

from course_lib.data.records import IMAGE_TOKEN

if TYPE_CHECKING:
    from collections.abc import Sequence

    import torch
    from matplotlib.figure import Figure
    from transformers import LlavaForConditionalGeneration, LlavaProcessor, PreTrainedTokenizerBase


def _first_image(record: dict) -> str | None:
    image = record.get("image")
    return image[0] if isinstance(image, list) else image


def show_samples(json_path: str | Path, image_dir: str | Path, n: int = 8, cols: int = 4) -> Figure:
    """A grid of the first `n` image samples of a LLaVA-format file, each titled with its first answer."""
    import textwrap

    records = [r for r in json.loads(Path(json_path).read_text()) if _first_image(r)][:n]
    rows = (len(records) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.6 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, rec in zip(axes.flat, records, strict=False):
        ax.imshow(Image.open(Path(image_dir) / _first_image(rec)))
        q = rec["conversations"][0]["value"].replace(IMAGE_TOKEN, "").strip()
        a = rec["conversations"][1]["value"]
        wrap = textwrap.TextWrapper(width=40, max_lines=3, placeholder=" …")  # whole words, never cut mid-word
        ax.set_title(wrap.fill(q) + "\n→ " + wrap.fill(a), fontsize=8)
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------- tokens, masks, splicing
# Pictures for notebooks 02 and 03. Token pictures draw one coloured cell per token, 16 to a row.

TOKEN_COLOURS = {"image": "#f4a259", "special": "#9fb8d9", "text": "#f2f2f2", "loss": "#7bc47f",
                 "ignored": "#d9d9d9", "pad": "#ffffff"}


def _unnormalise(pixel_values, image_processor):
    """A processor's normalised [3, H, W] tensor back to an [H, W, 3] array in 0..1 for imshow."""
    import numpy as np

    mean = np.asarray(image_processor.image_mean)[:, None, None]
    std = np.asarray(image_processor.image_std)[:, None, None]
    return (pixel_values.float().numpy() * std + mean).clip(0, 1).transpose(1, 2, 0)


def plot_image_to_tokens(image: Image.Image, processor: LlavaProcessor, max_tokens: int = 32) -> Figure:
    """The image, the processor's input with its patch grid (numbered in reading order), and the patches
    laid out as the row of image tokens they become (CLS dropped)."""
    import numpy as np

    pixels = processor.image_processor(images=[image.convert("RGB")], return_tensors="pt")["pixel_values"][0]
    shown, patch = _unnormalise(pixels, processor.image_processor), processor.patch_size
    rows, cols = shown.shape[0] // patch, shown.shape[1] // patch
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6), gridspec_kw={"width_ratios": [1, 1, 2.2]})
    axes[0].imshow(image)
    axes[0].set_title(f"original {image.width}x{image.height}", fontsize=9)
    axes[1].imshow(shown)
    axes[1].set_title(f"processor input {shown.shape[1]}x{shown.shape[0]}, {rows}x{cols} patches of {patch}px",
                      fontsize=9)
    for k in range(1, max(rows, cols)):
        axes[1].axhline(k * patch - 0.5, color="k", lw=0.6)
        axes[1].axvline(k * patch - 0.5, color="k", lw=0.6)
    if rows * cols <= 64:
        for r in range(rows):
            for c in range(cols):
                axes[1].text((c + 0.5) * patch, (r + 0.5) * patch, str(r * cols + c), ha="center", va="center",
                             fontsize=7, color="k", bbox={"fc": "w", "alpha": 0.6, "pad": 0.5, "lw": 0})
    n = min(rows * cols, max_tokens)
    tiles = [shown[(k // cols) * patch:(k // cols + 1) * patch, (k % cols) * patch:(k % cols + 1) * patch]
             for k in range(n)]
    strip = np.concatenate([np.pad(t, ((1, 1), (1, 1), (0, 0)), constant_values=0.4) for t in tiles], axis=1)
    axes[2].imshow(strip)
    more = f" (first {n} shown)" if n < rows * cols else ""
    axes[2].set_title(f"{rows * cols} patches -> {rows * cols} image tokens, in reading order{more}", fontsize=9)
    for ax in axes:
        ax.axis("off")
    fig.tight_layout()
    return fig


def _token_text(tokenizer, token_id: int) -> str:
    text = tokenizer.decode([token_id], skip_special_tokens=False, clean_up_tokenization_spaces=False)
    return text.replace("\n", "\\n").replace(" ", "·")[:12]


def _token_cells(input_ids, tokenizer, image_token_id: int, kinds: list[str], max_image_tokens: int):
    """(text, kind) per cell; a run of image tokens longer than `max_image_tokens` is shown shortened."""
    ids = [int(t) for t in input_ids]
    cells, k = [], 0
    while k < len(ids):
        run = k
        while run < len(ids) and ids[run] == image_token_id:
            run += 1
        if run - k > max_image_tokens:
            cells += [(IMAGE_TOKEN, kinds[k])] * (max_image_tokens - 1) + [(f"… x{run - k}", kinds[k])]
            k = run
            continue
        cells.append((IMAGE_TOKEN if ids[k] == image_token_id else _token_text(tokenizer, ids[k]), kinds[k]))
        k += 1
    return cells


def _draw_cells(cells: list[tuple[str, str]], title: str, legend: dict[str, str], cols: int = 16):
    from matplotlib.patches import Patch, Rectangle

    rows = (len(cells) + cols - 1) // cols
    fig, ax = plt.subplots(figsize=(cols * 0.85, rows * 0.42 + 1.0))
    for k, (text, kind) in enumerate(cells):
        r, c = divmod(k, cols)
        ax.add_patch(Rectangle((c, -r - 1), 0.95, 0.9, fc=TOKEN_COLOURS[kind], ec="#888888", lw=0.4))
        ax.text(c + 0.47, -r - 0.55, text, ha="center", va="center", fontsize=6.5, family="monospace")
    ax.set_xlim(-0.1, cols)
    ax.set_ylim(-rows - 0.1, 0.1)
    ax.axis("off")
    ax.set_title(title, fontsize=10)
    ax.legend(handles=[Patch(fc=TOKEN_COLOURS[k], ec="#888888", label=v) for k, v in legend.items()],
              loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=len(legend), fontsize=8, frameon=False)
    fig.tight_layout()
    return fig


def plot_prompt_tokens(input_ids: torch.Tensor | Sequence[int], tokenizer: PreTrainedTokenizerBase, image_token_id: int,
                       max_image_tokens: int = 32) -> Figure:
    """The tokens of one prompt, with the expanded image span(s) highlighted."""
    special = {i for i, token in tokenizer.added_tokens_decoder.items() if token.special}
    ids = [int(t) for t in input_ids]
    kinds = ["image" if t == image_token_id else "special" if t in special else "text" for t in ids]
    n_image = kinds.count("image")
    cells = _token_cells(ids, tokenizer, image_token_id, kinds, max_image_tokens)
    return _draw_cells(cells, f"{len(ids)} tokens, {n_image} of them image tokens",
                       {"image": "image token", "special": "special token", "text": "text token"})


def plot_label_mask(input_ids: torch.Tensor | Sequence[int], labels: torch.Tensor | Sequence[int],
                    tokenizer: PreTrainedTokenizerBase, image_token_id: int, max_image_tokens: int = 32) -> Figure:
    """The same tokens coloured by their label: green tokens carry loss, grey ones are IGNORE_INDEX."""
    ids, labels = [int(t) for t in input_ids], [int(y) for y in labels]
    kinds = ["loss" if y != -100 else "ignored" for y in labels]
    cells = _token_cells(ids, tokenizer, image_token_id, kinds, max_image_tokens)
    n_loss = kinds.count("loss")
    return _draw_cells(cells, f"labels: {n_loss} of {len(ids)} tokens carry loss",
                       {"loss": "label = token (loss)", "ignored": "label = -100 (no loss)"})


def plot_attention_masks(lengths: list[int]) -> Figure:
    """Who attends to whom: one sample (causal), a short sample right-padded, and all samples packed."""
    import torch

    from course_lib.data.collators import attention_matrix

    width = max(lengths)
    shortest = min(lengths)
    padded = torch.tensor([1] * shortest + [0] * (width - shortest))
    packed = torch.cat([torch.arange(n) for n in lengths])
    panels = [("causal: one sample", attention_matrix(length=width)),
              (f"padded: {shortest} tokens + {width - shortest} padding", attention_matrix(attention_mask=padded)),
              (f"packed: {len(lengths)} samples, one row", attention_matrix(position_ids=packed))]
    fig, axes = plt.subplots(1, 3, figsize=(12, 4.2), gridspec_kw={"width_ratios": [width, width, len(packed)]})
    for ax, (title, mask) in zip(axes, panels, strict=True):
        ax.imshow(mask.numpy(), cmap="Greens", vmin=0, vmax=1.3)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("key (attended to)", fontsize=8)
        ax.set_ylabel("query", fontsize=8)
        ax.tick_params(labelsize=7)
    fig.suptitle("attention masks: green = may attend", fontsize=10)
    fig.tight_layout()
    return fig


def plot_masked_scatter(model: LlavaForConditionalGeneration, input_ids: torch.Tensor, pixel_values: torch.Tensor,
                        dims: int = 48) -> Figure:
    """Where masked_scatter puts the projected image features: text embeddings, image features, and the
    spliced sequence the language model reads (first `dims` feature dimensions shown)."""
    import torch

    with torch.no_grad():
        embeds = model.get_input_embeddings()(input_ids[None])[0]
        features = torch.cat(list(model.model.get_image_features(pixel_values=pixel_values).pooler_output))
        mask = (input_ids == model.config.image_token_index)[:, None]
        spliced = embeds.masked_scatter(mask, features.to(embeds.dtype))
    panels = [(f"text embeddings {tuple(embeds.shape)}", embeds),
              (f"projected image features {tuple(features.shape)}", features),
              (f"after masked_scatter {tuple(spliced.shape)}", spliced)]
    # One colour scale for the embeddings before and after, so the spliced rows stand out by their scale.
    scale = float(embeds[~mask[:, 0]].abs().quantile(0.98)) if (~mask).any() else None
    fig, axes = plt.subplots(1, 4, figsize=(12, 5), gridspec_kw={"width_ratios": [1, 6, 6, 6]})
    axes[0].imshow(mask.float().numpy(), cmap="Oranges", aspect="auto", vmin=0, vmax=1)
    axes[0].set_title("image\ntoken?", fontsize=8)
    axes[0].set_xticks([])
    axes[0].set_ylabel("position in the sequence", fontsize=8)
    for ax, (title, values), shared in zip(axes[1:], panels, (True, False, True), strict=True):
        limits = {"vmin": -scale, "vmax": scale} if shared and scale else {}
        ax.imshow(values[:, :dims].float().numpy(), cmap="coolwarm", aspect="auto", **limits)
        ax.set_title(title, fontsize=8)
        ax.set_xlabel(f"first {dims} dims", fontsize=8)
        ax.tick_params(labelsize=7)
    fig.tight_layout()
    return fig


# Speed (course_lib.lessons.speed, notebook 08, benchmarks/packing.py)


def plot_throughput(result: dict) -> Figure:
    """Real tokens/s per mode, and the share of computed tokens that are real."""
    names = list(result["modes"])
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.2))
    axes[0].bar(names, [result["modes"][n]["real_tokens_per_s"] for n in names], color="tab:blue")
    axes[0].set_title("real (non-pad) tokens per second")
    for k, n in enumerate(names):
        axes[0].text(k, result["modes"][n]["real_tokens_per_s"], f"{result['speedup_vs_reference'][n]:.2f}x",
                     ha="center", va="bottom")
    share = [result["modes"][n]["real_share"] for n in names]
    axes[1].bar(names, share, color="tab:green", label="real")
    axes[1].bar(names, [1 - s for s in share], bottom=share, color="lightgray", label="padding")
    axes[1].set_title("computed tokens")
    axes[1].legend(loc="lower right")
    fig.suptitle(f"{result['geometry']} on {result['device']} ({result['dtype']}, {result['attn']})")
    fig.tight_layout()
    return fig


def plot_cost_growth(result: dict) -> Figure:
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.2))
    t = result["by_tokens"]
    axes[0].plot([r["tokens"] for r in t], [r["seconds"] for r in t], "o-")
    axes[0].set(xlabel="tokens per batch (rows of 256)", ylabel="step seconds", title="cost vs tokens")
    i = result["by_images"]
    axes[1].plot([r["images_per_sample"] for r in i], [r["seconds"] for r in i], "o-", color="tab:orange")
    axes[1].set(xlabel=f"images per sample ({result['image_tokens']} tokens each), 4 samples", ylabel="step seconds",
                title="cost vs images", xticks=[r["images_per_sample"] for r in i])
    fig.tight_layout()
    return fig


def plot_loader(rates: list[dict], consumed: float) -> Figure:
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.bar([f"{r['workers']} workers" for r in rates], [r["samples_per_s"] for r in rates], color="tab:purple")
    ax.axhline(consumed, color="black", linestyle="--", label=f"training step uses {consumed:.0f}/s")
    ax.set(ylabel="samples per second", title="data pipeline vs the step")
    ax.legend()
    fig.tight_layout()
    return fig


def plot_layouts(items: list[dict], modes: dict[str, list[int]], collators: dict[str, object]) -> Figure:
    """One step of each mode drawn as rows of tokens: a colour per sample, grey for padding."""
    from course_lib.data.collators import first_fit_decreasing

    fig, axes = plt.subplots(len(modes), 1, figsize=(10, 1.2 + 0.35 * sum(len(b) for b in modes.values())),
                             squeeze=False)
    palette = [c for k, c in enumerate(plt.get_cmap("tab20").colors) if k not in (14, 15)]  # no greys: grey is padding

    def cmap(k):
        return palette[k % len(palette)]

    for ax, (name, step) in zip(axes[:, 0], modes.items(), strict=True):
        batch = collators[name]([items[i] for i in step])
        rows, width = batch["input_ids"].shape
        if "attention_mask" in batch:  # padded: one sample per row, padding where the mask is 0
            for r, i in enumerate(step):
                real = batch["attention_mask"][r].bool()
                start = int(real.float().argmax())  # left padding starts the sample later
                ax.barh(r, int(real.sum()), left=start, color=cmap(i))
        else:  # packed: the collator's own first-fit-decreasing rows, samples end to end
            lengths = [len(items[i]["input_ids"]) for i in step]
            cap = collators[name].row_tokens or sum(lengths)
            for r, row in enumerate(first_fit_decreasing(lengths, cap)):
                left = 0
                for j in row:
                    ax.barh(r, lengths[j], left=left, color=cmap(step[j]), edgecolor="white")
                    left += lengths[j]
        ax.barh(range(rows), [width] * rows, color="lightgray", zorder=0)
        real = sum(len(items[i]["input_ids"]) for i in step)
        ax.set_title(f"{name}: {rows} rows x {width} tokens, {real / (rows * width):.0%} real", fontsize=9)
        ax.set_yticks([])
        ax.set_xlim(0, max(width, 1))
    axes[-1, 0].set_xlabel("token position")
    fig.tight_layout()
    return fig
