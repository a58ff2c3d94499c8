"""The tiny world: deterministic data, Qwen2.5-compatible tokenizer, a CLIP that learned something."""

import hashlib
import json

import torch
from PIL import Image
from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel

from course_lib.chat_template import QWEN2_5_TEMPLATE
from course_lib.shapes import WorldSpec, write_world


def _digest(folder):
    h = hashlib.sha256()
    for f in sorted(folder.rglob("*")):
        if f.is_file():
            h.update(f.relative_to(folder).as_posix().encode() + f.read_bytes())
    return h.hexdigest()


def test_world_is_deterministic_by_seed(tmp_path):
    spec = WorldSpec(n_pretrain=20, n_instruct=30, n_eval=10)
    write_world(tmp_path / "a", spec)
    write_world(tmp_path / "b", spec)
    write_world(tmp_path / "c", WorldSpec(seed=1, n_pretrain=20, n_instruct=30, n_eval=10))
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b") != _digest(tmp_path / "c")


def test_world_has_the_three_parts(tiny_world):
    pre = json.loads((tiny_world.data / "pretrain" / "chat.json").read_text())
    assert all(r["conversations"][0]["value"].endswith("<image>") for r in pre)  # CC3M puts it last
    inst = json.loads((tiny_world.data / "instruct" / "instruct.json").read_text())
    n_images = [len(r["image"]) if isinstance(r.get("image"), list) else int("image" in r) for r in inst]
    assert {0, 1, 2} <= set(n_images)
    assert any(len(r["conversations"]) > 2 for r in inst)  # multi-turn
    ev = json.loads((tiny_world.data / "eval" / "eval.json").read_text())
    assert {"color", "shape", "count", "position", "compare", "text"} <= {r["type"] for r in ev}
    assert all(r["answer"] == r["conversations"][1]["value"] for r in ev)


def test_tokenizer_carries_qwen_special_tokens_and_template(tiny_world):
    tok = AutoTokenizer.from_pretrained(tiny_world.llm)
    ids = tok.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    assert ids == list(range(ids[0], ids[0] + 3))  # consecutive, as in Qwen2.5
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>" and tok.bos_token is None
    assert tok.chat_template == QWEN2_5_TEMPLATE
    text = "<|im_start|>user\nWhat color is the circle?<|im_end|>"
    assert tok.decode(tok(text)["input_ids"]) == text


def test_tiny_clip_matches_images_to_their_captions(tiny_world):
    """Image-to-caption retrieval among 64 pairs: far above chance, so the contrastive stage worked."""
    pre = json.loads((tiny_world.data / "pretrain" / "chat.json").read_text())[-64:]
    model = CLIPModel.from_pretrained(tiny_world.clip).eval()
    tok = AutoTokenizer.from_pretrained(tiny_world.clip)
    proc = CLIPImageProcessor.from_pretrained(tiny_world.clip)
    images = [Image.open(tiny_world.data / "pretrain" / "images_dl" / r["image"]) for r in pre]
    texts = [r["conversations"][1]["value"] + "<|endoftext|>" for r in pre]
    enc = tok(texts, padding="max_length", max_length=32, return_tensors="pt")
    with torch.no_grad():
        out = model(pixel_values=proc(images=images, return_tensors="pt")["pixel_values"], **enc)
    # Several scenes can share a caption, so a hit is the right caption *text*.
    best = out.logits_per_image.argmax(-1)
    acc = sum(texts[b] == texts[i] for i, b in enumerate(best.tolist())) / len(texts)
    assert acc > 0.3, acc  # chance is about 1/64
