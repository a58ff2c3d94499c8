"""Probes of the tiny world's parts, the numbers behind RESULTS.md's "where the missing accuracy is".

    python -m benchmarks.probes lm DIR      # a causal LM folder: answer questions about scenes told in words
    python -m benchmarks.probes side WORLD  # a world folder: read each patch's side back from its CLIP feature

`lm` asks 600 fresh questions, greedy, scored like the eval (`eval.is_correct`): the scene's caption
stands where the image will be, as in the LM's pretraining chats. It measures what the LM brings to
stage 2: if it cannot bind "the red object" to its shape in words, it will not from image tokens.
`side` fits a linear read-out of left/right from each patch's layer -2 feature (what LLaVA uses) on
1500 fresh images and tests it on 500 others.
"""

from __future__ import annotations

import argparse
import random
from collections import defaultdict

import torch

from course_lib.eval import is_correct
from course_lib.world.scenes import caption, compare_question, questions, random_scene, render, text_only_qa


def probe_items(n: int = 600, seed: int = 1234) -> list[tuple[str, str, str]]:
    """(type, prompt, answer): 15% text-only, 20% compare, the rest one question about one scene."""
    rng = random.Random(seed)
    items = []
    for _ in range(n):
        r = rng.random()
        if r < 0.15:
            items.append(text_only_qa(rng))
        elif r < 0.35:
            scenes = [random_scene(rng) for _ in range(2)]
            q, a = compare_question(scenes, rng)
            items.append(("compare", f"first: {caption(scenes[0])}\nsecond: {caption(scenes[1])}\n{q}", a))
        else:
            scene = random_scene(rng)
            qtype, q, a = rng.choice(questions(scene, rng))
            items.append((qtype, f"{caption(scene)}\n{q}", a))
    return items


@torch.no_grad()
def lm_probe(path: str, n: int = 600, batch_size: int = 50) -> dict[str, float]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    hits = defaultdict(list)
    items = probe_items(n)
    for start in range(0, len(items), batch_size):
        chunk = items[start:start + batch_size]
        texts = [tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
                 for _, q, _ in chunk]
        enc = tok(texts, return_tensors="pt", padding=True)
        out = model.generate(**enc, max_new_tokens=8, do_sample=False)
        for (qtype, _, answer), ids in zip(chunk, out[:, enc["input_ids"].shape[1]:]):
            hits[qtype].append(is_correct(tok.decode(ids, skip_special_tokens=True), answer))
    result = {t: sum(v) / len(v) for t, v in sorted(hits.items())}
    result["all"] = sum(sum(v) for v in hits.values()) / len(items)
    return result


@torch.no_grad()
def side_probe(world: str, n_fit: int = 1500, n_test: int = 500, layer: int = -2) -> dict[str, float]:
    from transformers import CLIPImageProcessor, CLIPVisionModel

    model = CLIPVisionModel.from_pretrained(f"{world}/clip").eval()
    proc = CLIPImageProcessor.from_pretrained(f"{world}/clip")
    size = proc.crop_size["height"]
    rng = random.Random(7)
    scenes = [random_scene(rng) for _ in range(n_fit + n_test)]
    pixels = proc(images=[render(s, size, rng) for s in scenes], return_tensors="pt")["pixel_values"]
    feats = torch.cat([model(pixel_values=pixels[i:i + 500], output_hidden_states=True).hidden_states[layer][:, 1:]
                       for i in range(0, len(scenes), 500)])
    n_tokens = feats.shape[1]
    grid = int(n_tokens ** 0.5)
    col = torch.arange(n_tokens) % grid
    side = (col * 2 // grid).repeat(len(scenes))  # 0 left, 1 right
    cell = ((torch.arange(n_tokens) // grid) * 2 // grid) * 2 + col * 2 // grid  # each token's 2x2 cell
    filled = torch.zeros(len(scenes), 4, dtype=torch.bool)
    for i, s in enumerate(scenes):
        filled[i, [o.cell for o in s.objects]] = True
    occupied = filled[:, cell].reshape(-1)
    x = torch.cat([feats.reshape(-1, feats.shape[-1]), torch.ones(len(side), 1)], dim=1)
    fit, test = slice(0, n_fit * n_tokens), slice(n_fit * n_tokens, None)
    w = torch.linalg.lstsq(x[fit], torch.nn.functional.one_hot(side[fit], 2).float()).solution
    right = (x[test] @ w).argmax(1).eq(side[test]).float()
    return {"tokens per image": n_tokens, "all patches": right.mean().item(),
            "occupied cells": right[occupied[test]].mean().item()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("probe", choices=("lm", "side"))
    parser.add_argument("path", help="a causal LM folder (lm) or a tiny world folder (side)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    result = lm_probe(args.path) if args.probe == "lm" else side_probe(args.path)
    print(" ".join(f"{k}={v:.1%}" if isinstance(v, float) else f"{k}={v}" for k, v in result.items()))


if __name__ == "__main__":
    main()
