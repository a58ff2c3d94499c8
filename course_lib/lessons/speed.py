"""Measuring training speed: padded vs packed batches, the data pipeline, and how cost grows.

`benchmarks/packing.py` (`python -m benchmarks.packing`, `make bench`) is the command line; notebook
08 runs a small version of it. Every number comes from the same process, and speed is reported as a
ratio of modes measured side by side, alternating, over several rounds (the median), because absolute
times on a shared machine wander.

The samples are synthetic token sequences with images, with lengths shaped like LLaVA-1.5's
instruction mix: many short caption-like samples (LCS-558K / CC3M style: one image + a sentence),
long multi-turn conversations about one image (LLaVA-Instruct) and long text-only chats (ShareGPT).
Padding such a mix to the longest sample of a random batch wastes most of the computed tokens.

Modes (same model, same samples, same optimizer step):
* `reference`: `ReferenceCollator`, a random batch left-padded to its longest sample, as in the
  from-scratch LLaVA tutorials (the baseline of every ratio here);
* `grouped`: `PaddedCollator` after `LengthGroupedSampler`-style grouping (similar lengths per batch);
* `packed`: the whole pool bin-packed (first-fit decreasing) into rows of `row_tokens`, with
  `PackedCollator`: no padding between samples, only at the end of each row.

Model FLOPs follow the PaLM appendix B formula: 6 N per token for the weights plus 12 L d n per token
for attention over a sample of n tokens, counting real tokens only (padding is not useful work). MFU
divides that by the matmul rate measured on the same device in the same run.
"""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.utils.data import Dataset

from course_lib.data.collators import PackedCollator, PaddedCollator, ReferenceCollator, first_fit_decreasing
from course_lib.data.image_tokens import num_image_tokens
from course_lib.data.labels import IGNORE_INDEX
from course_lib.lessons.peak import peak_rates
from course_lib.model import packed_attention
from course_lib.model.geometry import CLIP_L_336, QWEN2_5
from course_lib.util.tables import render_table

if TYPE_CHECKING:
    from transformers import LlavaForConditionalGeneration

# Text lengths (tokens) of the three kinds of sample, and their shares of the mix.
MIX = {
    "tiny": {"caption": (0.5, 12, 40), "conversation": (0.35, 120, 700), "text-only": (0.15, 200, 900)},
    "real": {"caption": (0.5, 20, 60), "conversation": (0.35, 150, 1200), "text-only": (0.15, 300, 1900)},
}


@dataclass
class Geometry:
    """Model shapes: the tiny world's, or CLIP-L/336 with Qwen2.5-0.5B / 1.5B (random weights)."""

    name: str
    vision: dict
    text: dict
    row_tokens: int  # model_max_length: the packing row capacity
    mix: str = "tiny"


GEOMETRIES = {
    "tiny": Geometry("tiny", dict(image_size=64, patch_size=16, hidden_size=128, intermediate_size=512,
                                  num_hidden_layers=3, num_attention_heads=4),
                     dict(hidden_size=256, intermediate_size=704, num_hidden_layers=4, num_attention_heads=4,
                          num_key_value_heads=2, vocab_size=576, tie_word_embeddings=False), row_tokens=1024),
    **{size: Geometry(size, CLIP_L_336, QWEN2_5[f"Qwen/Qwen2.5-{size[8:].upper()}-Instruct"], row_tokens=2048,
                      mix="real") for size in ("qwen2.5-0.5b", "qwen2.5-1.5b")},
}


def build_model(geometry: Geometry, attn: str = "sdpa", dtype: torch.dtype = torch.float32, device: str = "cpu",
                seed: int = 0) -> LlavaForConditionalGeneration:
    """A randomly initialised LlavaForConditionalGeneration with the geometry's shapes (the real classes)."""
    from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration, Qwen2Config

    text = Qwen2Config(**geometry.text, max_position_embeddings=32768, rope_theta=1e6, use_cache=False,
                       bos_token_id=0, eos_token_id=1, pad_token_id=0)
    config = LlavaConfig(vision_config=CLIPVisionConfig(**geometry.vision), text_config=text,
                         image_token_index=geometry.text["vocab_size"] - 1,
                         image_seq_length=num_image_tokens(geometry.vision), vision_feature_layer=-2,
                         vision_feature_select_strategy="default", projector_hidden_act="gelu",
                         tie_word_embeddings=geometry.text["tie_word_embeddings"])
    if attn == packed_attention.NAME:
        packed_attention.register()
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlavaForConditionalGeneration._from_config(config, attn_implementation=attn, dtype=dtype)
    model.config.text_config.use_cache = False
    return model


def make_samples(geometry: Geometry, n: int, seed: int = 0, images_per_sample: int | None = None,
                 text_tokens: int | None = None) -> list[dict]:
    """Synthetic LlavaDataset-like items: `<image>` tokens first, random text, loss on the last 70%."""
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    vocab, image_id = geometry.text["vocab_size"], geometry.text["vocab_size"] - 1
    size = geometry.vision["image_size"]
    kinds = list(MIX[geometry.mix].items())
    items = []
    for i in range(n):
        name, (_, lo, hi) = rng.choices(kinds, weights=[k[1][0] for k in kinds])[0]
        n_images = images_per_sample if images_per_sample is not None else int(name != "text-only")
        n_text = text_tokens or rng.randint(lo, hi)
        n_text = min(n_text, geometry.row_tokens - n_images * num_image_tokens(geometry.vision))
        text = torch.randint(2, min(vocab - 1, 32000), (n_text,), generator=gen)
        input_ids = torch.cat([torch.full((n_images * num_image_tokens(geometry.vision),), image_id), text])
        labels = input_ids.clone()
        labels[: len(input_ids) - int(0.7 * n_text)] = IGNORE_INDEX
        item = {"id": f"{name}-{i}", "input_ids": input_ids, "labels": labels}
        if n_images:
            item["pixel_values"] = torch.randn(n_images, 3, size, size, generator=gen)
        items.append(item)
    return items


def reference_batches(items: list[dict], batch_size: int, seed: int) -> list[list[int]]:
    """A random order cut into batches: what a default sampler gives."""
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def grouped_batches(items: list[dict], batch_size: int, seed: int) -> list[list[int]]:
    """Sorted by length, cut into batches, batches shuffled (length grouping over one megabatch)."""
    order = sorted(range(len(items)), key=lambda i: len(items[i]["input_ids"]))
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    random.Random(seed).shuffle(batches)
    return batches


def packed_batches(items: list[dict], row_tokens: int, rows_per_step: int, seed: int) -> list[list[int]]:
    """First-fit-decreasing bins of `row_tokens`; bins of similar fill share a step; steps shuffled.

    A step's rows are padded to its fullest row, so the few part-full bins FFD leaves go together.
    """
    lengths = [len(it["input_ids"]) for it in items]
    bins = sorted(first_fit_decreasing(lengths, row_tokens), key=lambda b: sum(lengths[i] for i in b))
    steps = [[i for b in bins[k:k + rows_per_step] for i in b] for k in range(0, len(bins), rows_per_step)]
    random.Random(seed).shuffle(steps)
    return steps


def _to(batch: dict, device: str, dtype: torch.dtype) -> dict:
    out = {}
    for k, v in batch.items():
        if isinstance(v, torch.Tensor):
            v = v.to(device, non_blocking=True)
            if k == "pixel_values":
                v = v.to(dtype)
        out[k] = v
    return out


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


@dataclass
class Mode:
    name: str
    collator: object
    batches: list[list[int]]


def train_pass(model: nn.Module, optimizer: torch.optim.Optimizer, items: list[dict], mode: Mode, device: str,
               dtype: torch.dtype) -> dict:
    """One pass over `items` in the mode's batches: forward, backward, optimizer step. Returns counts."""
    computed = 0
    # Collated before the clock starts: this times the step; loader_rates measures the data pipeline.
    batches = [mode.collator([items[i] for i in b]) for b in mode.batches]
    _sync(device)
    start = time.perf_counter()
    for batch in batches:
        batch = _to(batch, device, dtype)
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        computed += batch["input_ids"].numel()
    _sync(device)
    seconds = time.perf_counter() - start
    real = sum(len(items[i]["input_ids"]) for b in mode.batches for i in b)
    return {"seconds": seconds, "real_tokens": real, "computed_tokens": computed, "steps": len(batches)}


def model_flops(model: LlavaForConditionalGeneration, items: list[dict]) -> float:
    """Training FLOPs of the useful work in `items`: 6 N per token + 12 L d n per token of attention."""
    lm = model.model.language_model
    text_params = sum(p.numel() for p in lm.parameters()) - lm.embed_tokens.weight.numel()
    text_params += model.lm_head.weight.numel()
    vision = model.model.vision_tower.config
    vision_params = sum(p.numel() for p in model.model.vision_tower.parameters())
    vision_params += sum(p.numel() for p in model.model.multi_modal_projector.parameters())
    cfg = lm.config
    vision_tokens = num_image_tokens(vision) + 1  # CLS too: the tower computes it
    flops = 0.0
    for it in items:
        n = len(it["input_ids"])
        flops += 6 * text_params * n + 12 * cfg.num_hidden_layers * cfg.hidden_size * n * n
        images = 0 if it.get("pixel_values") is None else len(it["pixel_values"])
        flops += images * (6 * vision_params * vision_tokens
                           + 12 * vision.num_hidden_layers * vision.hidden_size * vision_tokens ** 2)
    return flops


def throughput(geometry: Geometry, n_samples: int = 96, batch_size: int = 8, repeats: int = 5,
               device: str = "cpu", dtype: torch.dtype = torch.float32, attn: str = "sdpa",
               gradient_checkpointing: bool = False, seed: int = 0,
               progress: Callable[[str], None] | None = None) -> dict:
    """Padded vs packed training passes over the same samples, alternating, `repeats` rounds."""
    model = build_model(geometry, attn=attn, dtype=dtype, device=device, seed=seed)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)  # tiny lr: the model stays sane over rounds
    items = make_samples(geometry, n_samples, seed)
    lengths = [len(it["input_ids"]) for it in items]
    rows_per_step = max(1, round(batch_size * statistics.mean(lengths) / geometry.row_tokens))
    modes = [Mode("reference", ReferenceCollator(0), reference_batches(items, batch_size, seed)),
             Mode("grouped", PaddedCollator(0), grouped_batches(items, batch_size, seed)),
             Mode("packed", PackedCollator(10 ** 9, row_tokens=geometry.row_tokens), packed_batches(
                 items, geometry.row_tokens, rows_per_step, seed))]
    # FlashAttention-2's varlen kernel and sdpa_packed (course_lib.model.packed_attention) take the samples' bounds
    # from the collator's cu_seq_lens, and flex attention's block mask is built from the restarting position_ids
    # (transformers' find_packed_sequence_indices): all three skip cross-sample blocks, so one flat row per step
    # costs nothing extra. SDPA and eager would pay for a dense [T, T] mask: they keep rows of row_tokens.
    if attn in ("flash_attention_2", "flex_attention", "sdpa_packed"):
        modes.append(Mode("packed-1row", PackedCollator(10 ** 9), packed_batches(
            items, geometry.row_tokens, rows_per_step, seed)))
    train_pass(model, optimizer, items[:batch_size], Mode("warmup", PaddedCollator(0), [list(range(batch_size))]),
               device, dtype)
    rounds: dict[str, list[dict]] = {m.name: [] for m in modes}
    for r in range(repeats):
        for mode in (modes if r % 2 == 0 else modes[::-1]):  # alternate the order: drift hits every mode alike
            if device.startswith("cuda"):
                torch.cuda.reset_peak_memory_stats()
            result = train_pass(model, optimizer, items, mode, device, dtype)
            if device.startswith("cuda"):
                result["peak_memory_gb"] = torch.cuda.max_memory_allocated() / 2 ** 30
            rounds[mode.name].append(result)
            if progress:
                rate = result["real_tokens"] / result["seconds"]
                progress(f"round {r + 1}/{repeats} {mode.name}: {rate:.0f} real tok/s")
    rates = peak_rates(device, dtype)
    peak = max(rates.values())
    flops = model_flops(model, items)
    summary = {}
    for name, results in rounds.items():
        seconds = statistics.median(r["seconds"] for r in results)
        first = results[0]
        summary[name] = {
            "real_tokens_per_s": first["real_tokens"] / seconds,
            "real_share": first["real_tokens"] / first["computed_tokens"],
            "steps": first["steps"], "seconds": seconds, "mfu": flops / seconds / peak,
            **({"peak_memory_gb": max(r["peak_memory_gb"] for r in results)} if "peak_memory_gb" in first else {}),
        }
    ratios = {name: statistics.median(a["seconds"] / b["seconds"] for a, b in zip(rounds["reference"], results))
              for name, results in rounds.items()}
    return {"geometry": geometry.name, "device": device, "dtype": str(dtype).replace("torch.", ""), "attn": attn,
            "gradient_checkpointing": gradient_checkpointing, "samples": n_samples, "batch_size": batch_size,
            "rows_per_step": rows_per_step, "row_tokens": geometry.row_tokens, "repeats": repeats,
            "mean_length": statistics.mean(lengths), "max_length": max(lengths),
            "matmul_tflops": peak / 1e12, "matmul_tflops_by_dtype": {k: v / 1e12 for k, v in rates.items()},
            "modes": summary, "speedup_vs_reference": ratios}


def cost_growth(geometry: Geometry, device: str = "cpu", dtype: torch.dtype = torch.float32, attn: str = "sdpa",
                tokens: tuple[int, ...] = (256, 512, 1024, 2048), images: tuple[int, ...] = (1, 2, 4),
                repeats: int = 3, seed: int = 0) -> dict:
    """Step time against tokens per batch (text-only rows) and against images per sample (fixed text)."""
    model = build_model(geometry, attn=attn, dtype=dtype, device=device, seed=seed)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)

    def step_time(items: list[dict]) -> float:
        mode = Mode("x", PaddedCollator(0), [list(range(len(items)))])
        train_pass(model, optimizer, items, mode, device, dtype)  # warm-up for this shape
        return statistics.median(train_pass(model, optimizer, items, mode, device, dtype)["seconds"]
                                 for _ in range(repeats))

    by_tokens = []
    for t in tokens:  # rows of 256 text tokens: work grows with the number of rows
        items = make_samples(geometry, max(1, t // 256), seed, images_per_sample=0, text_tokens=min(t, 256))
        by_tokens.append({"tokens": t, "seconds": step_time(items)})
    by_images = []
    for k in images:
        items = make_samples(geometry, 4, seed, images_per_sample=k, text_tokens=64)
        by_images.append({"images_per_sample": k, "tokens": len(items[0]["input_ids"]) * 4,
                          "seconds": step_time(items)})
    return {"by_tokens": by_tokens, "by_images": by_images, "image_tokens": num_image_tokens(geometry.vision)}


def loader_rates(dataset: Dataset, collator: Callable[[list[dict]], dict], batch_size: int = 16,
                 workers: tuple[int, ...] = (0, 1, 2),
                 batches: int = 20) -> list[dict]:
    """Samples per second that dataset + collator deliver with 0, 1, 2 DataLoader workers."""
    from torch.utils.data import DataLoader, RandomSampler

    rates = []
    for w in workers:
        sampler = RandomSampler(dataset, num_samples=batch_size * batches, generator=torch.Generator().manual_seed(0))
        loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, collate_fn=collator, num_workers=w,
                            persistent_workers=False, pin_memory=torch.cuda.is_available())
        start = time.perf_counter()
        n = batch_size * sum(1 for _ in loader)
        rates.append({"workers": w, "samples_per_s": n / (time.perf_counter() - start)})
    return rates


def step_rate(model: nn.Module, dataset: Dataset, collator: Callable[[list[dict]], dict], batch_size: int = 16,
              steps: int = 5) -> float:
    """Samples per second the training step consumes (batches collated beforehand, one warm-up step)."""
    param = next(model.parameters())
    items = [dataset[i % len(dataset)] for i in range((steps + 1) * batch_size)]
    batches = [list(range(s * batch_size, (s + 1) * batch_size)) for s in range(steps + 1)]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    model.train()
    train_pass(model, optimizer, items, Mode("warm-up", collator, batches[:1]), str(param.device), param.dtype)
    result = train_pass(model, optimizer, items, Mode("step", collator, batches[1:]), str(param.device), param.dtype)
    model.eval()
    return steps * batch_size / result["seconds"]


def format_throughput(result: dict, markdown: bool = False) -> str:
    """The modes side by side: real tokens/s, real share, steps, ratio to the reference, MFU (+ peak memory)."""
    peak = "peak_memory_gb" in result["modes"]["packed"]
    header = ["mode", "real tokens/s", "real share", "steps", "vs reference", "MFU"] + (["peak GiB"] if peak else [])
    body = [[name, f"{m['real_tokens_per_s']:.0f}", f"{m['real_share']:.1%}", str(m["steps"]),
             f"{result['speedup_vs_reference'][name]:.2f}x", f"{m['mfu']:.1%}"]
            + ([f"{m['peak_memory_gb']:.1f}"] if peak else []) for name, m in result["modes"].items()]
    return render_table(header, body, markdown)
