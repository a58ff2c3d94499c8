"""The real-shaped world: the real Qwen2.5 tokenizer, configs, generation settings and CLIP-L/336 geometry with
small random weights, so the practitioner's path runs here as it will on a GPU: build, stage 1, stage 2 with
LLaVA-1.5's own flags, merge, chat and eval, on real photos (scikit-image's)."""

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from course_lib.build import build_llava
from course_lib.world.real_shaped import (
    INTERLEAVE_FILES,
    INTERLEAVE_ID,
    LLM_NAME,
    VISION_NAME,
    ensure_real_shaped_world,
    qwen2_5_tokenizer,
)

REPO = Path(__file__).resolve().parents[1]
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket")  # 512x512, 600x400, 451x300, 640x427


@pytest.fixture(scope="module")
def real_world():
    return ensure_real_shaped_world()


def test_the_tokenizer_gives_published_qwen2_5_ids_offline():
    tok = qwen2_5_tokenizer()
    assert len(tok) == 151665 and tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    # Published ids: the issue's two English lines, and Chinese as Qwen2.5's tokenizer.json gives it.
    assert tok("<|im_start|>hello<|im_end|>").input_ids == [151644, 14990, 151645]
    assert tok(" hello sir. How are you Edward?").input_ids == [23811, 27048, 13, 2585, 525, 498, 21891, 30]
    assert tok("你好，世界！I love LLM.").input_ids == [108386, 3837, 99489, 6313, 40, 2948, 444, 10994, 13]
    assert tok("cafe\u0301").input_ids == tok("caf\u00e9").input_ids  # NFC, as Qwen normalises
    assert tok.convert_ids_to_tokens([151643, 151656, 151657, 151664]) == [
        "<|endoftext|>", "<|video_pad|>", "<tool_call>", "<|file_sep|>"]
    assert "<|im_start|>" in tok.all_special_tokens and "<tool_call>" not in tok.all_special_tokens


@pytest.fixture(scope="module")
def llava(real_world, tmp_path_factory):
    """An empty LLaVA built from the real-shaped backbones by name, as from hub ids; fp32 for exact checks."""
    out = tmp_path_factory.mktemp("real_llava")
    model, processor = build_llava(VISION_NAME, LLM_NAME, out, dtype="float32")
    return out, model, processor


def test_build_keeps_qwen_tokens_ties_embeddings_and_gives_576_image_tokens(llava, real_world):
    from skimage import data
    from transformers import LlavaForConditionalGeneration, Qwen2ForCausalLM

    out, model, processor = llava
    tok = processor.tokenizer
    assert {"<|im_start|>", "<|im_end|>", "<|vision_pad|>", "<image>"} <= set(tok.all_special_tokens)
    photo = Image.fromarray(data.coffee())
    inputs = processor(images=photo, text="<image>\nWhat is this?", return_tensors="pt")
    assert (inputs["input_ids"] == model.config.image_token_index).sum().item() == 576
    assert inputs["pixel_values"].shape[-2:] == (336, 336)
    reloaded = LlavaForConditionalGeneration.from_pretrained(out)
    assert reloaded.config.text_config.tie_word_embeddings
    assert reloaded.lm_head.weight.data_ptr() == reloaded.get_input_embeddings().weight.data_ptr()
    llm = Qwen2ForCausalLM.from_pretrained(real_world.llm, dtype=torch.float32)
    ids = tok("你好，世界！ What is 2 plus 2?", return_tensors="pt").input_ids
    with torch.no_grad():
        diff = (reloaded(input_ids=ids).logits - llm(input_ids=ids).logits).abs().max().item()
    assert diff < 1e-5


def test_greedy_clears_qwen2_5_sampling_and_repetition_penalty(llava):
    """Qwen2.5's generation_config samples (T 0.7, top_p 0.8, top_k 20) with repetition_penalty 1.1: the
    chat's greedy answer must be the plain argmax continuation."""
    from course_lib.chat import Chat
    from course_lib.serving.loading import load_trained

    out, _, _ = llava
    loaded = load_trained(out, device="cpu")
    assert loaded.model.generation_config.repetition_penalty == 1.1
    answer = Chat(loaded).ask("red or red?", max_new_tokens=6)
    messages = [{"role": "user", "content": [{"type": "text", "text": "red or red?"}]}]
    ids = loaded.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                               return_tensors="pt", return_dict=True)["input_ids"]
    with torch.no_grad():
        for _ in range(6):
            ids = torch.cat([ids, loaded.model(input_ids=ids).logits[:, -1:].argmax(-1)], dim=1)
    expected = loaded.processor.tokenizer.decode(ids[0, -6:], skip_special_tokens=True)
    assert answer == expected.split("<|im_end|>")[0]


@pytest.fixture(scope="module")
def photo_data(tmp_path_factory):
    """scikit-image's photos in LLaVA's layout: captions for stage 1, multi-turn chat (Chinese included, one
    text-only sample) for stage 2, and an eval set with answers."""
    from skimage import data

    root = tmp_path_factory.mktemp("photos")
    (root / "images").mkdir()
    for name in PHOTOS:
        Image.fromarray(getattr(data, name)()).convert("RGB").save(root / "images" / f"{name}.jpg", quality=90)
    captions = [{"id": n, "image": f"{n}.jpg", "conversations": [
        {"from": "human", "value": "<image>\nDescribe the photo briefly."},
        {"from": "gpt", "value": f"A photo of a {n}."}]} for n in PHOTOS]
    chats = [{"id": f"chat_{n}", "image": f"{n}.jpg", "conversations": [
        {"from": "human", "value": "<image>\n这是什么？"}, {"from": "gpt", "value": f"这是{n}。"},
        {"from": "human", "value": "Say it in English."}, {"from": "gpt", "value": f"It is a {n}."}]}
        for n in PHOTOS] + [{"id": "text_only", "conversations": [
            {"from": "human", "value": "What is 2 plus 2?"}, {"from": "gpt", "value": "4"}]}]
    evals = [{"id": f"eval_{n}", "image": f"{n}.jpg", "type": "name", "answer": n, "conversations": [
        {"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": n}]} for n in PHOTOS[:2]]
    for name, records in (("captions", captions), ("chat", chats), ("eval", evals)):
        (root / f"{name}.json").write_text(json.dumps(records, ensure_ascii=False))
    return root


@pytest.mark.launcher
def test_the_practitioners_path_runs_at_real_shapes(llava, photo_data, tmp_path, capsys):
    """Stage 1 through run_zero2.sh with LLaVA-1.5's pretrain flags (frozen towers bit-identical), stage 2 with its
    finetune_lora flags (padding saved in the processor), merge (same greedy answer as base + adapter), chat
    on a real photo, and eval: all at the real vocabulary and 576 tokens per image."""
    from safetensors.torch import load_file

    from course_lib.chat import Chat
    from course_lib.eval import main as eval_main
    from course_lib.merge import merge_lora
    from course_lib.serving.loading import load_trained

    folder, _, _ = llava
    images = ["--image_folder", str(photo_data / "images")]
    fast = ["--max_steps", "2", "--per_device_train_batch_size", "2", "--report_to", "none", "--save_strategy",
            "no", "--model_max_length", "1024", "--learning_rate", "1e-3"]
    stage1 = tmp_path / "pretrain"
    # Stage 1 as a practitioner runs it: run_zero2.sh (one rank here) with LLaVA-1.5's pretrain.sh flags.
    path = f"{Path(sys.executable).parent}:{os.environ['PATH']}"
    proc = subprocess.run(["bash", str(REPO / "run_zero2.sh"), "--model_name_or_path", str(folder), "--data_path",
                           str(photo_data / "captions.json"), *images, "--output_dir", str(stage1), "--version",
                           "plain", "--tune_mm_mlp_adapter", "True", "--mm_projector_type", "mlp2x_gelu",
                           "--mm_vision_select_layer", "-2", "--mm_use_im_start_end", "False",
                           "--mm_use_im_patch_token", "False", "--tf32", "True", "--vision_tower",
                           "openai/clip-vit-large-patch14-336", *fast],
                          capture_output=True, text=True, env={**os.environ, "PATH": path, "NUM_PROCS": "1"},
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((stage1 / "training_summary.json").read_text())
    assert summary["stage"] == "pretrain" and summary["args"]["template"] == "plain"
    assert summary["steps"] == 2 and summary["skipped"] == {}
    before, after = load_file(folder / "model.safetensors"), load_file(stage1 / "model.safetensors")
    frozen = [k for k in before if "multi_modal_projector" not in k]
    assert frozen and all(torch.equal(before[k], after[k].to(before[k].dtype)) for k in frozen)
    assert any(not torch.equal(before[k], after[k].to(before[k].dtype)) for k in before if k not in frozen)

    # Stage 2 as a practitioner runs it: run_zero2.sh, 2 ranks, LLaVA-1.5's finetune_lora flags (the modality
    # grouping makes the text-only sample a batch of its own on one rank).
    lora = tmp_path / "lora"
    env = {**os.environ, "PATH": path, "NUM_PROCS": "2"}
    cmd = ["bash", str(REPO / "run_zero2.sh"), "--model_name_or_path", str(stage1), "--data_path",
           str(photo_data / "chat.json"), *images, "--output_dir", str(lora), "--lora_enable", "True",
           "--lora_r", "8", "--lora_alpha", "16", "--mm_projector_lr", "2e-5", "--version", "qwen_2",
           "--image_aspect_ratio", "pad", "--group_by_modality_length", "True", "--bf16", "True",
           "--lazy_preprocess", "True", "--mm_use_im_start_end", "False", "--evaluation_strategy", "no",
           "--warmup_ratio", "0.03", *fast[:3], "1", *fast[4:]]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((lora / "training_summary.json").read_text())
    assert summary["train_type"] == "use_lora" and summary["samples"] == 5 and summary["skipped"] == {}
    # Padding travels in the saved processor: plain transformers (and vLLM) pad as training did.
    from transformers import AutoProcessor

    from course_lib.data.tiling import prepare_images

    saved = AutoProcessor.from_pretrained(lora)
    assert saved.image_processor.do_pad
    rocket = Image.open(photo_data / "images" / "rocket.jpg")
    original = AutoProcessor.from_pretrained(stage1)
    trained_on = original.image_processor(images=prepare_images([rocket], original, pad_to_square=True)[0],
                                          return_tensors="pt")["pixel_values"]
    assert torch.allclose(saved.image_processor(images=[rocket], return_tensors="pt")["pixel_values"], trained_on)

    merged = tmp_path / "merged"
    merge_lora(lora, merged)
    photo = photo_data / "images" / "coffee.jpg"
    answers = {}
    for name, path in (("lora", lora), ("merged", merged)):
        loaded = load_trained(path, device="cpu")
        assert loaded.preprocessing["pad_to_square"]
        answers[name] = Chat(loaded).ask("这是什么？", [photo], max_new_tokens=8)
    assert answers["lora"] == answers["merged"]

    assert eval_main(["--model", str(merged), "--data", str(photo_data / "eval.json"), "--out",
                      str(tmp_path / "report.json")]) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["n"] == 2 and report["models"][0]["generation"]["do_sample"] is False


@pytest.fixture
def interleave_from_the_hub(real_world, tmp_path, monkeypatch):
    """llava-interleave-qwen-0.5b-hf reached by its hub id, offline: the real-shaped copy placed in a hub cache
    (models--owner--name/refs/main -> snapshots/<commit>), as `huggingface_hub` leaves a download."""
    import shutil

    from huggingface_hub import constants

    commit = "0123456789abcdef0123456789abcdef01234567"
    storage = tmp_path / "hub" / ("models--" + INTERLEAVE_ID.replace("/", "--"))
    shutil.copytree(real_world.interleave, storage / "snapshots" / commit)
    (storage / "refs").mkdir()
    (storage / "refs" / "main").write_text(commit)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return storage / "snapshots" / commit


def test_a_hub_llava_of_another_shape_chats_as_its_model_card_runs_it(interleave_from_the_hub, real_world):
    """SigLIP (729 tokens per image, no class token), layer -1, `<image>` at 151646, its own chat template:
    the course's loader, chat and widget take it by hub id and answer what transformers' own recipe answers."""
    from skimage import data

    from course_lib.chat import Chat
    from course_lib.serving.generation import GenerationSettings
    from course_lib.serving.loading import load_trained
    from course_lib.serving.widgets import ChatUI

    for name in ("config.json", "chat_template.json", "preprocessor_config.json", "tokenizer_config.json"):
        hub = json.loads((INTERLEAVE_FILES / name).read_text())
        ours = json.loads((real_world.interleave / name).read_text())
        if name == "config.json":  # the hub's file but for depth and width
            for part in ("text_config", "vision_config"):
                for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                            "num_key_value_heads"):
                    hub[part].pop(key, None), ours[part].pop(key, None)
        assert ours == hub, name
    loaded = load_trained(INTERLEAVE_ID, device="cpu")
    model, processor = loaded.model, loaded.processor
    assert loaded.path == interleave_from_the_hub and loaded.name == INTERLEAVE_ID and loaded.dtype == torch.float32
    assert type(model.model.vision_tower).__name__ == "SiglipVisionModel"
    assert model.config.text_config.tie_word_embeddings and model.lm_head.weight.shape[0] == 152000

    photos = [Image.fromarray(data.astronaut()), Image.fromarray(data.coffee())]
    question = "What is shown?"
    # The model card's recipe: the processor's chat template, then the processor, then greedy generate.
    conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    prompt = processor.apply_chat_template(conversation, add_generation_prompt=True)
    assert prompt == "<|im_start|>user\n<image>\nWhat is shown?<|im_end|>\n<|im_start|>assistant\n"
    inputs = processor(images=photos[0], text=prompt, return_tensors="pt")
    assert (inputs["input_ids"] == 151646).sum() == 729 and inputs["pixel_values"].shape[-2:] == (384, 384)
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    expected = processor.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert expected

    chat = Chat(loaded, GenerationSettings(max_new_tokens=6))
    assert chat.ask(question, [photos[0]]) == expected
    second = chat.ask("And this one?", [photos[1]])  # two images in one conversation: 2 x 729 tokens
    assert second and len(chat.images) == 2

    from test_widgets import upload_value

    ui = ChatUI(models=[INTERLEAVE_ID], runs_dir=[])
    assert ui.picker.value == INTERLEAVE_ID
    png = io.BytesIO()
    photos[0].save(png, format="PNG")
    ui.upload.value = upload_value(("astronaut.png", png.getvalue()))
    ui.max_new_tokens.value = 6
    ui.message.value = question
    ui.send.click()
    assert ui.entries[-1].role == "assistant" and ui.entries[-1].text == expected
