"""The real-GPU plan of notebook 10 (course_lib.lessons.gpu_plan): every formula against something built or measured."""

from __future__ import annotations

import importlib.util
import json
import os
import shlex
from pathlib import Path

import pytest
import torch

from course_lib.lessons import gpu_plan as gp
from course_lib.model.geometry import CLIP_L_336, QWEN2_5

REPO = Path(__file__).resolve().parents[1]
RESULTS = json.loads((REPO / "benchmarks" / "gpu_2026-11-30" / "results.json").read_text())
SMALL = dict(hidden_size=256, intermediate_size=704, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
             vocab_size=1000, tie_word_embeddings=False)


@pytest.mark.parametrize("size", list(gp.SIZES))
def test_param_counts_equal_the_models_built_on_the_meta_device(size):
    from transformers import CLIPVisionConfig, Qwen2Config

    from course_lib.lessons.inspect_llava import count_params
    from course_lib.lessons.speed import build_model

    text = QWEN2_5[gp.SIZES[size]]
    counts = gp.param_counts(text)
    assert counts["vision_tower"] == count_params(CLIPVisionConfig(**CLIP_L_336))
    assert counts["embed_tokens"] + counts["decoder"] + counts["lm_head"] == count_params(Qwen2Config(**text))
    llava = build_model(gp.geometry(size), device="meta")
    assert sum(counts.values()) == sum(p.numel() for p in llava.parameters())


def test_trainable_counts_match_prepare_model():
    from course_lib.lessons.speed import build_model
    from course_lib.training.zero import trainable_counts

    counts = trainable_counts(lambda: build_model(gp.geometry("0.5B"), device="meta"))
    text = QWEN2_5[gp.SIZES["0.5B"]]
    assert {t: gp.total_and_trainable(text, t) for t in counts} == counts


def test_zero2_memory_by_hand_and_frozen_parameters_hold_no_optimizer_state():
    total, trainable, gpus = 7_000_000_000, 1_000_000_000, 8
    # 2 bytes of bf16 weights for all; per trainable one 2 (bf16 gradient) + 12 (Adam) + 4 (DeepSpeed's fp32
    # gradient copy), the last three split over the GPUs by ZeRO-2.
    by_hand = (2 * total + (2 + 12 + 4) * trainable / gpus) / 2 ** 30
    assert gp.model_state_gib(total, trainable, gpus, zero=2) == pytest.approx(by_hand, rel=1e-12)
    for zero in (0, 1, 2):  # a frozen parameter costs its 2 bytes of weights and nothing else
        more_frozen = gp.model_state_gib(total + 10 ** 9, trainable, gpus, zero) - gp.model_state_gib(total, trainable,
                                                                                                     gpus, zero)
        assert more_frozen * 2 ** 30 == pytest.approx(2 * 10 ** 9)
    assert gp.model_state_gib(total, 0, gpus, zero=2) * 2 ** 30 == pytest.approx(2 * total)


def test_model_states_match_deepspeeds_estimators():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    n, largest = 1_000_000_000, 100_000_000
    _, z2 = estimate_zero2_model_states_mem_needs(n, num_gpus_per_node=8, cpu_offload=False)
    _, z3, _ = estimate_zero3_model_states_mem_needs(n, largest, num_gpus_per_node=8, cpu_offload=False,
                                                     cpu_offload_params=False)
    assert gp.model_state_gib(n, n, 8, 2) == pytest.approx(z2 / 2 ** 30, rel=1e-9)
    assert gp.model_state_gib(n, n, 8, 3, largest) == pytest.approx(z3 / 2 ** 30, rel=1e-9)


def _lm_saved_per_layer(kind: str, n: int = 48) -> float:
    """Bytes autograd saves per token per layer: a 3-layer minus a 1-layer Qwen2, in bf16 with SDPA."""
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2Config, Qwen2ForCausalLM

    saved = []
    for layers in (1, 3):
        torch.manual_seed(0)
        model = Qwen2ForCausalLM._from_config(Qwen2Config(**{**SMALL, "num_hidden_layers": layers}, use_cache=False),
                                              attn_implementation="sdpa", dtype=torch.bfloat16)
        model.requires_grad_(kind == "trainable")
        if kind == "lora":
            targets = [f"{t}_proj" for t in gp.LORA_TARGETS]
            config = LoraConfig(r=gp.LORA_R, lora_alpha=32, lora_dropout=0.05, target_modules=targets)
            model = get_peft_model(model, config).to(torch.bfloat16)  # DeepSpeed's bf16 casts the adapters too
        model.train()
        embeds = torch.randn(1, n, SMALL["hidden_size"], dtype=torch.bfloat16, requires_grad=True)
        saved.append(gp.saved_bytes(model, inputs_embeds=embeds, labels=torch.randint(0, 1000, (1, n))))
    return (saved[1] - saved[0]) / 2 / n


@pytest.mark.parametrize("kind", ["trainable", "frozen", "lora"])
def test_decoder_layer_formula_equals_what_autograd_saves(kind):
    # On CPU dropout keeps its mask in the input's dtype (2 bytes); CUDA keeps a bool (1 byte).
    assert _lm_saved_per_layer(kind) == gp.decoder_layer_bytes(SMALL, kind, dropout_mask_bytes=2)


def test_clip_layer_formula_equals_what_autograd_saves():
    from transformers import CLIPVisionConfig, CLIPVisionModel

    vision = dict(hidden_size=128, intermediate_size=512, num_attention_heads=4, image_size=64, patch_size=16)
    saved = []
    for layers in (1, 3):
        config = CLIPVisionConfig(**vision, num_hidden_layers=layers, hidden_act="quick_gelu")
        model = CLIPVisionModel._from_config(config, attn_implementation="sdpa", dtype=torch.bfloat16)
        model.train()
        saved.append(gp.saved_bytes(model, pixel_values=torch.randn(1, 3, 64, 64, dtype=torch.bfloat16)))
    tokens = (64 // 16) ** 2 + 1
    # On CPU LayerNorm keeps its mean and rstd in bf16 (2 bytes); CUDA keeps them in fp32.
    assert (saved[1] - saved[0]) / 2 / tokens == gp.clip_layer_bytes(vision, stat_bytes=2)


def test_checkpointing_and_frozen_parts_need_less_memory():
    text = QWEN2_5[gp.SIZES["7B"]]
    act = {t: gp.activation_gib(text, t, 10_000, 10, False) for t in ("pretrain", "freeze_vision", "none")}
    assert act["pretrain"] < act["freeze_vision"] < act["none"]
    for t in ("pretrain", "use_lora", "freeze_vision", "none"):
        assert gp.activation_gib(text, t, 10_000, 10, True) < gp.activation_gib(text, t, 10_000, 10, False)


def test_memory_model_lands_near_the_peaks_measured_on_an_h200():
    rows = gp.benchmark_peaks(RESULTS, ("0.5b-sdpa-gc", "1.5b-sdpa", "1.5b-sdpa-gc"))
    assert all(0.85 < r["estimate / measured"] < 1.15 for r in rows), rows


def test_full_finetune_flops_are_the_benchmarks_count():
    """The benchmark measured MFU with `lessons.speed.model_flops`; the plan must count the same work for a
    full finetune, and less where parts are frozen."""
    from course_lib.lessons.speed import build_model, model_flops

    text, n = QWEN2_5[gp.SIZES["0.5B"]], 900
    model = build_model(gp.geometry("0.5B"), device="meta")
    item = {"input_ids": list(range(n)), "pixel_values": [None]}
    # model_flops also runs the projector over CLS (577 tokens, not 576): 6 N_projector FLOPs apart.
    assert gp.sample_flops(text, "none", n, 1) == pytest.approx(model_flops(model, [item]), rel=1e-5)
    flops = [gp.sample_flops(text, t, n, 1) for t in ("pretrain", "use_lora", "freeze_vision", "none")]
    assert flops == sorted(flops) and flops[0] < 0.75 * flops[2]  # frozen LM: 4 FLOPs per weight, not 6


def test_measured_mfu_rescales_the_recorded_run():
    t = RESULTS["1.5b-sdpa"]["throughput"]
    assert gp.measured_mfu(RESULTS, "1.5b-sdpa", t["matmul_tflops"]) == pytest.approx(t["modes"]["packed"]["mfu"])
    assert gp.measured_mfu(RESULTS, "1.5b-sdpa", 989) < t["modes"]["packed"]["mfu"]  # the data sheet's peak is higher


def test_dataset_words_come_from_the_data_path_model():
    spec = importlib.util.spec_from_file_location("data_path", REPO / "benchmarks" / "data_path.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    rows = {name: (count, (lo + hi) / 2, q + a + 1) for name, _, count, (lo, hi), q, a in module.MIX}
    count, rounds, words = rows["llava_instruct"]
    instruct = gp.DATASETS["LLaVA-Instruct-150K"]
    assert (instruct.samples, instruct.rounds, instruct.words) == (count, rounds, rounds * words)
    mix = gp.DATASETS["llava_v1_5_mix665k"]
    total = sum(c for c, _, _ in rows.values())
    assert mix.words == pytest.approx(sum(c * r * w for c, r, w in rows.values()) / total, abs=0.5)
    assert mix.rounds == pytest.approx(sum(c * r for c, r, _ in rows.values()) / total, abs=0.01)


def test_chat_template_tokens_are_the_llava_templates_with_qwen2_5s_tokenizer():
    from course_lib.model.chat_template import LLAVA_QWEN_TEMPLATE
    from course_lib.world.real_shaped import qwen2_5_tokenizer

    tokenizer = qwen2_5_tokenizer()
    turn = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]  # 1 token each
    for rounds in (1, 3):
        text = tokenizer.apply_chat_template(turn * rounds, chat_template=LLAVA_QWEN_TEMPLATE, tokenize=False)
        assert len(tokenizer(text)["input_ids"]) == rounds * (gp.CHAT_ROUND_TOKENS + 2)


def test_the_real_commands_parse(tmp_path):
    from course_lib.training.arguments import parse_args

    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "llava"}))
    (model / "projector.safetensors").write_bytes(b"")
    data = tmp_path / "data.json"
    data.write_text("[]")
    for command in gp.real_commands("7B"):
        if "run_zero2.sh" not in command:
            continue
        flags = shlex.split(command.split("run_zero2.sh", 1)[1])
        swap = {"--model_name_or_path": str(model), "--data_path": str(data), "--image_folder": str(tmp_path),
                "--output_dir": str(tmp_path / "out")}
        flags = [swap.get(flags[i - 1], f) if i else f for i, f in enumerate(flags)]
        margs, dargs, targs = parse_args(flags)
        assert dargs.packing and targs.gradient_checkpointing and dargs.model_max_length == 2048
        assert targs.per_device_train_batch_size == gp.MICRO_BATCH[margs.stage]
