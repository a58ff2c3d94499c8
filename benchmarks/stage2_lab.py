"""Stage 2 in one process on precomputed image features: the what-if bench behind RESULTS.md, session 6.

    python -m benchmarks.stage2_lab --world WORLD --out DIR --steps 1000                    # the world's CLIP
    python -m benchmarks.stage2_lab --world WORLD --out DIR --steps 1500 --features oracle  # perfect features
    python -m benchmarks.stage2_lab --world WORLD --out DIR --init random                   # LM from scratch

It answers "is it the vision features or the language model?" in minutes instead of a full run. The
frozen CLIP's layer -2 patch features (LLaVA's default) are computed once; a fresh LLaVA-1.5 MLP projector
and the world's Qwen2 LM then train on the instruct set (all turns, loss on the answers only, ChatML with
no default system prompt), and every `--eval_every` steps it answers the held-out set greedily, scored
like `course_lib.eval`, with the single-image types also split by the number of objects (`shape@3`).

`--features oracle` replaces each token's CLIP feature by what it should know: one-hots of the colour and
shape of the object in its grid cell (zero for background) and of its row and column. The scenes are
replayed from the world's seed, and the replayed images are checked byte for byte against the world's.

Not the course's training path (no stage 1, no Trainer, no DeepSpeed): only for comparing variants with
each other. The course's own numbers come from `benchmarks/accuracy_sweep.py`.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch
from PIL import Image
from torch import nn

from course_lib.build import build_llava
from course_lib.data.labels import PromptEncoder
from course_lib.data.records import to_sample
from course_lib.eval import is_correct
from course_lib.world import scenes as shapes


def _images(record: dict) -> list[str]:
    image = record.get("image", [])
    return [image] if isinstance(image, str) else image


def encode_record(encoder: PromptEncoder, part: str, record: dict, n_img: int, train: bool):
    """The course's own encoding (ChatML without a default system prompt, loss on the answers only), with
    each image's run of image tokens turned into a slot the lab fills with projected features."""
    sample = to_sample(record, 0)
    if train:
        encoded = encoder.encode(sample)
        ids, labels = list(encoded.input_ids), list(encoded.labels)
    else:  # the first question, ending with the generation prompt, as course_lib.eval asks it
        first = next(i for i, m in enumerate(sample.messages) if m["role"] == "user")
        text = encoder.tokenizer.apply_chat_template(list(sample.messages[:first + 1]), tokenize=False,
                                                     add_generation_prompt=True)
        ids = encoder.tokens(text)
        labels = [-100] * len(ids)
    positions = [k for k, t in enumerate(ids) if t == encoder.image_token_id]  # n_img per image, in order
    slots = [(start, (part, name)) for start, name in zip(positions[::n_img], sample.images, strict=True)]
    ids = [0 if t == encoder.image_token_id else t for t in ids]
    return ids, labels, slots


@torch.no_grad()
def clip_features(world: Path, records: dict[str, list[dict]]) -> dict[tuple[str, str], torch.Tensor]:
    from transformers import CLIPImageProcessor, CLIPVisionModel

    model = CLIPVisionModel.from_pretrained(world / "clip").eval()
    proc = CLIPImageProcessor.from_pretrained(world / "clip")
    feats = {}
    for part, recs in records.items():
        names = sorted({n for r in recs for n in _images(r)})
        for i in range(0, len(names), 500):
            chunk = names[i:i + 500]
            images = [Image.open(world / "data" / part / "images" / n).convert("RGB") for n in chunk]
            hidden = model(pixel_values=proc(images=images, return_tensors="pt")["pixel_values"],
                           output_hidden_states=True).hidden_states[-2][:, 1:]
            feats.update({(part, n): f for n, f in zip(chunk, hidden)})
    return feats


def oracle_features(world: Path, grid: int, dim: int = 128) -> dict[tuple[str, str], torch.Tensor]:
    """Replay write_world, catching the scene drawn before each saved image."""
    spec = shapes.WorldSpec(**json.loads((world / "config.json").read_text())["world"])
    scenes, last = {}, {}
    render, save = shapes.render, shapes._save

    def spy_render(scene, *args, **kwargs):
        last["scene"] = scene
        return render(scene, *args, **kwargs)

    def spy_save(img, folder, name):
        scenes[(Path(folder).parent.name, name)] = (last["scene"], img)
        return name

    shapes.render, shapes._save = spy_render, spy_save
    try:
        with tempfile.TemporaryDirectory() as tmp:  # only the json files get written
            shapes.write_world(Path(tmp), spec)
    finally:
        shapes.render, shapes._save = render, save
    colors, kinds = list(shapes.COLORS), list(shapes.SHAPES)
    feats = {}
    for (part, name), (scene, img) in scenes.items():
        if part == "eval" and len(feats) % 50 == 0:  # spot-check the replay against the world's own images
            saved = Image.open(world / "data" / part / "images" / name).convert("RGB")
            assert saved.tobytes() == img.tobytes(), f"replayed scene differs from the world's image {name}"
        f = torch.zeros(grid * grid, dim)
        for p in range(grid * grid):
            row, col = divmod(p, grid)
            f[p, 7 + row] = f[p, 7 + grid + col] = 1
            for obj in scene.objects:
                if obj.cell == (row * 2 // grid) * 2 + col * 2 // grid:
                    f[p, colors.index(obj.color)] = f[p, 4 + kinds.index(obj.shape)] = 1
        feats[(part, name)] = 3 * f
    return feats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--world", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--features", choices=["clip", "oracle"], default="clip")
    parser.add_argument("--init", choices=["pretrained", "random"], default="pretrained")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--eval_every", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    from transformers import AutoTokenizer, Qwen2ForCausalLM

    world, out = Path(args.world), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    tok = AutoTokenizer.from_pretrained(world / "qwen2")
    records = {p: json.loads((world / "data" / p / f"{p}.json").read_text()) for p in ("instruct", "eval")}
    if args.features == "oracle":
        grid = 64 // json.loads((world / "clip" / "config.json").read_text())["vision_config"]["patch_size"]
        feats = oracle_features(world, grid)
    else:
        feats = clip_features(world, records)
    n_img = next(iter(feats.values())).shape[0]

    encoder = PromptEncoder(build_llava(str(world / "clip"), str(world / "qwen2"))[1], template="chat")

    def encode(part: str, record: dict, train: bool):
        """ids (image slots as 0), labels, [(slot start, feature key)]; for eval: the first question only."""
        return encode_record(encoder, part, record, n_img, train)

    train = [encode("instruct", r, True) for r in records["instruct"]]
    evals = [(r["type"], r.get("objects") or [0], r["answer"], encode("eval", r, False)) for r in records["eval"]]
    lm = Qwen2ForCausalLM.from_pretrained(world / "qwen2")
    if args.init == "random":
        lm = Qwen2ForCausalLM(lm.config)
    width = lm.config.hidden_size
    projector = nn.Sequential(nn.Linear(next(iter(feats.values())).shape[1], width), nn.GELU(), nn.Linear(width, width))
    embed_tokens = lm.get_input_embeddings()

    def embed(batch):
        length = max(len(ids) for ids, _, _ in batch)
        ids = torch.full((len(batch), length), tok.pad_token_id)
        mask = torch.zeros(len(batch), length, dtype=torch.long)
        labels = torch.full((len(batch), length), -100)
        for i, (x, y, _) in enumerate(batch):
            ids[i, :len(x)], mask[i, :len(x)], labels[i, :len(y)] = torch.tensor(x), 1, torch.tensor(y)
        embeds = embed_tokens(ids).clone()
        spans = [(i, s, key) for i, (_, _, slots) in enumerate(batch) for s, key in slots]
        if spans:
            projected = projector(torch.stack([feats[key] for _, _, key in spans]))
            for (i, s, _), p in zip(spans, projected):
                embeds[i, s:s + n_img] = p
        return embeds, mask, labels

    @torch.no_grad()
    def evaluate() -> dict[str, float]:
        lm.eval()
        end = {tok.convert_tokens_to_ids("<|im_end|>"), tok.pad_token_id}
        hits = defaultdict(list)
        for qtype, objects, answer, sample in evals:
            x, _, _ = embed([sample])
            past, answer_ids = None, []
            for _ in range(12):
                out = lm(inputs_embeds=x, past_key_values=past, use_cache=True)
                past, nxt = out.past_key_values, int(out.logits[0, -1].argmax())
                if nxt in end:
                    break
                answer_ids.append(nxt)
                x = embed_tokens(torch.tensor([[nxt]]))
            ok = is_correct(tok.decode(answer_ids), answer)
            hits[qtype].append(ok)
            if qtype in ("color", "count", "position", "shape"):
                hits[f"{qtype}@{max(objects)}"].append(ok)
        lm.train()
        result = {k: round(100 * sum(v) / len(v), 1) for k, v in sorted(hits.items())}
        result["all"] = round(100 * sum(sum(v) for k, v in hits.items() if "@" not in k) / len(evals), 1)
        return result

    params = list(lm.parameters()) + list(projector.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    warmup = max(1, args.steps * 3 // 100)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, args.steps) / args.steps)))
    rng, log, start = random.Random(args.seed), [], time.time()
    lm.train()
    for step in range(1, args.steps + 1):
        embeds, mask, labels = embed(rng.sample(train, args.batch_size))
        loss = lm(inputs_embeds=embeds, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % args.eval_every == 0 or step == args.steps:
            result = {"step": step, "loss": round(loss.item(), 4), **evaluate(), "seconds": round(time.time() - start)}
            log.append(result)
            print(json.dumps(result), flush=True)
            (out / "log.json").write_text(json.dumps({"args": vars(args), "log": log}, indent=1))


if __name__ == "__main__":
    main()
