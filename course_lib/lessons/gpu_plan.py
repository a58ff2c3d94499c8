"""Planning a real run (notebook 10): memory per GPU and training time, by stage, train type, model size and ZeRO.

Everything is arithmetic on the real configs (`course_lib.model.geometry`), and each part is checked against
something measured (tests/test_gpu_plan.py, notebook 10):
- parameter counts (`param_counts`) equal those of the models built on the meta device;
- the activation formulas (`decoder_layer_bytes`, `clip_layer_bytes`) equal the bytes autograd saves for a
  small Qwen2 / CLIP in bf16 (`saved_bytes`);
- the whole memory model lands near the peak memory measured on an H200 (`benchmark_peaks`);
- the time model lands near LLaVA-1.5's own reported hours (`LLAVA_1_5_HOURS`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from course_lib.data.image_tokens import num_image_tokens
from course_lib.model.geometry import CLIP_L_336, QWEN2_5
from course_lib.training.zero import zero_memory_gb

if TYPE_CHECKING:
    from course_lib.lessons.speed import Geometry

SIZES = {"0.5B": "Qwen/Qwen2.5-0.5B-Instruct", "1.5B": "Qwen/Qwen2.5-1.5B-Instruct", "7B": "Qwen/Qwen2.5-7B-Instruct"}
# Dense bf16 tensor-core peaks from NVIDIA's data sheets (H100 SXM and H200: 989 TFLOP/s without sparsity,
# the 1979 quoted beside it assumes 2:4 sparsity; A100: 312).
PEAK_TFLOPS = {"H100/H200": 989.0, "A100": 312.0}
# Memory a process can use, GiB: what nvidia-smi reports (H100 80GB: 81,559 MiB; A100 80GB: 81,920 MiB; H200:
# 143,771 MiB, in benchmarks/gpu_2026-11-30/log.txt). CUDA's context and NCCL take some of it.
GPU_MEMORY_GIB = {"H100": 81_559 / 1024, "A100 80GB": 81_920 / 1024, "H200": 143_771 / 1024}
# Per-GPU micro-batches of LLaVA-1.5's scripts (pretrain.sh 32, finetune.sh and finetune_lora.sh 16), as
# notebooks 04 and 05's GPU cells pass them.
MICRO_BATCH = {"pretrain": 32, "finetune": 16}
LORA_R = 16  # the course's default --lora_r (course_lib.training.arguments)
LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")  # course_lib.model.lora.LORA_TARGETS
BF16 = 2  # bytes


def geometry(size: str) -> Geometry:
    """CLIP-L/336 + Qwen2.5 of `size`, as `lessons.speed` builds it (random weights, any device, `meta` too)."""
    from course_lib.lessons.speed import Geometry

    return Geometry(f"qwen2.5-{size.lower()}", CLIP_L_336, QWEN2_5[SIZES[size]], row_tokens=2048, mix="real")


# --- Parameters -------------------------------------------------------------------------------------------

def _kv_width(text: dict) -> int:
    return text["num_key_value_heads"] * text["hidden_size"] // text["num_attention_heads"]


def decoder_layer_params(text: dict) -> int:
    """One Qwen2 decoder layer: q/k/v with biases, o without, the SwiGLU MLP, two RMSNorm weights."""
    h, kv, i = text["hidden_size"], _kv_width(text), text["intermediate_size"]
    return (h * h + h) + 2 * (h * kv + kv) + h * h + 3 * h * i + 2 * h


def clip_params(vision: dict) -> int:
    """CLIPVisionModel: patch conv (no bias), CLS and position embeddings, pre/post LayerNorm, the layers."""
    h, i, p = vision["hidden_size"], vision["intermediate_size"], vision["patch_size"]
    tokens = num_image_tokens(vision) + 1  # CLS too
    layer = 4 * (h * h + h) + (h * i + i) + (i * h + h) + 2 * 2 * h
    return 3 * p * p * h + h + tokens * h + 2 * 2 * h + vision["num_hidden_layers"] * layer


def param_counts(text: dict, vision: dict = CLIP_L_336) -> dict[str, int]:
    """Parameters per part of the LLaVA (`lm_head` is 0 when tied to the embeddings)."""
    h, v = text["hidden_size"], vision["hidden_size"]
    return {"vision_tower": clip_params(vision), "projector": v * h + h + h * h + h,  # LLaVA-1.5's 2-layer MLP
            "embed_tokens": text["vocab_size"] * h,
            "decoder": text["num_hidden_layers"] * decoder_layer_params(text) + h,  # + the final norm
            "lm_head": 0 if text["tie_word_embeddings"] else text["vocab_size"] * h}


def lora_params(text: dict, r: int = LORA_R) -> int:
    """LoRA's A (in x r) and B (r x out) on every linear layer of the language model."""
    h, kv, i = text["hidden_size"], _kv_width(text), text["intermediate_size"]
    in_out = {"q": (h, h), "k": (h, kv), "v": (h, kv), "o": (h, h), "gate": (h, i), "up": (h, i), "down": (i, h)}
    return text["num_hidden_layers"] * r * sum(a + b for a, b in (in_out[t] for t in LORA_TARGETS))


def total_and_trainable(text: dict, train_type: str, r: int = LORA_R) -> tuple[int, int]:
    """(all parameters, trainable ones) as `training.trainable.prepare_model` sets them; `use_lora` keeps
    PEFT's trainable copy of the projector (`modules_to_save`) beside the frozen original."""
    c = param_counts(text)
    total = sum(c.values())
    if train_type == "use_lora":
        return total + c["projector"] + lora_params(text, r), c["projector"] + lora_params(text, r)
    trainable = {"pretrain": c["projector"], "freeze_vision": total - c["vision_tower"], "none": total}[train_type]
    return total, trainable


def model_state_gib(total: int, trainable: int, gpus: int, zero: int, largest: int = 0) -> float:
    """Model states per GPU under DeepSpeed: the ZeRO paper's arithmetic (`zero_memory_gb`) plus what
    DeepSpeed's own estimators add (notebook 08, section 4, checks both): ZeRO-2 keeps an fp32 copy of its
    gradient partition (4 bytes per trainable parameter over the GPUs); ZeRO-3 counts 2 bytes more per
    trainable parameter over the GPUs and gathers the largest layer (4 bytes per parameter of it)."""
    extra = 4 * trainable / gpus if zero == 2 else 2 * trainable / gpus + 4 * largest if zero == 3 else 0
    return zero_memory_gb(total, gpus, zero, trainable=trainable) + extra / 2 ** 30


# --- Activations ------------------------------------------------------------------------------------------

def decoder_layer_bytes(text: dict, kind: str, r: int = LORA_R, dropout_mask_bytes: int = 1) -> int:
    """Bytes autograd keeps per token for one Qwen2 layer in bf16 with SDPA / FlashAttention (no T x T
    scores), counted tensor by tensor (each RMSNorm: its fp32 input, 4h, and rsqrt, 4; attention: q, k, v,
    its output and log-sum-exp; the MLP: gate, up, SiLU(gate)):
    - `trainable`: + every linear's input and the normalised input of each norm weight;
    - `frozen` (stage 1's language model: gradients flow through, no weight gets one): no linear inputs;
    - `lora` (frozen + LoRA on 7 linears): per adapter its dropout mask (1 byte per input on CUDA),
      the dropped-out input (2 bytes) and A's output (2r)."""
    h, kv, i, heads = text["hidden_size"], _kv_width(text), text["intermediate_size"], text["num_attention_heads"]
    attention = BF16 * (h + 2 * kv + h) + 4 * heads  # q, k, v, output + fp32 log-sum-exp per head
    if kind == "trainable":
        return 2 * (4 * h + 4 + BF16 * h + BF16 * h) + attention + 4 * BF16 * i
    frozen = 2 * (4 * h + 4) + attention + 3 * BF16 * i
    if kind == "frozen":
        return frozen
    adapter_inputs = 6 * h + i  # q, k, v, o, gate and up read h wide, down reads i
    return frozen + (dropout_mask_bytes + BF16) * adapter_inputs + len(LORA_TARGETS) * BF16 * r


def clip_layer_bytes(vision: dict, stat_bytes: int = 4) -> int:
    """Bytes autograd keeps per token for one trained CLIP layer in bf16: each LayerNorm its input and
    output and two statistics (fp32 on CUDA), q, k, v, the attention output and log-sum-exp, the residual
    after attention, fc1's output and quick-GELU's sigmoid, fc2's input."""
    h, i, heads = vision["hidden_size"], vision["intermediate_size"], vision["num_attention_heads"]
    return BF16 * (8 * h + 3 * i) + 4 * heads + 2 * 2 * stat_bytes


def logits_bytes(text: dict) -> int:
    """Per token at the loss: bf16 logits (2V), transformers' fp32 copy for the loss (4V) and the saved
    log-probabilities (4V). With Qwen's 152K vocabulary this rivals a whole layer stack."""
    return 10 * text["vocab_size"]


def activation_gib(text: dict, train_type: str, tokens: float, images: float, checkpointing: bool,
                   vision: dict = CLIP_L_336, r: int = LORA_R) -> float:
    """Activation memory of one micro-batch of `tokens` LM tokens and `images` images. With gradient
    checkpointing every layer keeps only its input (2h bytes per token) and one layer at a time is recomputed
    whole during the backward pass. A frozen vision tower keeps nothing (no gradient reaches it)."""
    kind = {"pretrain": "frozen", "use_lora": "lora"}.get(train_type, "trainable")
    layer, L, h = decoder_layer_bytes(text, kind, r), text["num_hidden_layers"], text["hidden_size"]
    lm = (L * BF16 * h + layer) if checkpointing else L * layer
    total = tokens * (lm + logits_bytes(text)) + images * num_image_tokens(vision) * BF16 * (
        vision["hidden_size"] + 2 * h)  # the projector's input, GELU's input and output
    if train_type == "none":
        v_layer, v_tokens = clip_layer_bytes(vision), num_image_tokens(vision) + 1
        per_token = (vision["num_hidden_layers"] * BF16 * vision["hidden_size"] + v_layer) if checkpointing \
            else vision["num_hidden_layers"] * v_layer
        total += images * v_tokens * per_token
    return total / 2 ** 30


def saved_bytes(model: torch.nn.Module, **inputs) -> int:
    """Bytes of the tensors autograd saves for the backward pass during `model(**inputs)`, measured with
    `torch.autograd.graph.saved_tensors_hooks`: each storage once, the parameters left out."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(**inputs)
    return sum(seen.values())


# --- Data, FLOPs and time ---------------------------------------------------------------------------------

TOKENS_PER_WORD = 4 / 3  # English BPE text, OpenAI's rule of thumb (0.75 words per token)
# The LLaVA chat template, counted with the real tokenizer (`course_lib.world.real_shaped.qwen2_5_tokenizer`,
# tests/test_gpu_plan.py): <|im_start|>role\n ... <|im_end|>\n around each turn, and no system turn (the data has
# none, and the template adds no default one).
CHAT_ROUND_TOKENS = 10


@dataclass(frozen=True)
class Dataset:
    name: str
    samples: int
    with_image: int  # samples with one image (576 image tokens each); the rest are text-only
    words: float  # mean words of text per sample
    rounds: float  # mean question-answer rounds; 0 = the plain template (caption + eos)
    source: str

    @property
    def text_tokens(self) -> float:
        template = CHAT_ROUND_TOKENS * self.rounds if self.rounds else 1
        return self.words * TOKENS_PER_WORD + template

    @property
    def tokens_per_sample(self) -> float:
        return self.with_image / self.samples * num_image_tokens(CLIP_L_336) + self.text_tokens


DATASETS = {d.name: d for d in [
    Dataset("LLaVA-CC3M-Pretrain-595K", 595_375, 595_375, 11, 0,
            "records: the dataset card; words: an estimate (CC3M alt-text captions are one short sentence)"),
    Dataset("LLaVA-Pretrain LCS-558K", 558_128, 558_128, 11, 0,
            "records: LLaVA-1.5's pretraining set; words: an estimate (short BLIP captions)"),
    Dataset("LLaVA-Instruct-150K", 157_712, 157_712, 219, 3,
            "records: LLaVA-1.5 Table 7; words and rounds: benchmarks/data_path.py's model of the source "
            "(1-5 rounds of 12-word questions and 60-word answers)"),
    Dataset("llava_v1_5_mix665k", 665_298, 665_298 - 40_688, 146, 4.68,
            "records: the file (haotian-liu/LLaVA issue 657: 665,298, 40,688 text-only); words and rounds: "
            "benchmarks/data_path.py's model of its ten sources"),
]}
STAGE_DATA = {"pretrain": "LLaVA-CC3M-Pretrain-595K", "finetune": ("LLaVA-Instruct-150K", "llava_v1_5_mix665k")}


def sample_flops(text: dict, train_type: str, lm_tokens: float, images: float, vision: dict = CLIP_L_336,
                 r: int = LORA_R) -> float:
    """Training FLOPs for one sample, PaLM's count (appendix B; `lessons.speed.model_flops`): 2 per weight per
    token forward, 4 L h n per token for attention, split into what the step needs. The backward pass costs
    the forward again for the activation gradients (wherever a trained weight lies upstream) and once more for
    the weight gradients (only where weights train); attention has no weights, its backward is twice its
    forward. Every train type trains the projector, so gradients flow back through the whole language model;
    only `none` trains the vision tower, and a frozen tower runs forward only. Recomputation by gradient
    checkpointing is not counted: it shows up in the measured MFU instead."""
    c = param_counts(text, vision)
    lm_weights = c["decoder"] + text["vocab_size"] * text["hidden_size"]  # the LM head's matmul, tied or not
    L, h = text["num_hidden_layers"], text["hidden_size"]
    lm_passes = 3 if train_type in ("freeze_vision", "none") else 2
    flops = 2 * lm_weights * lm_tokens * lm_passes + 4 * L * h * lm_tokens ** 2 * 3
    if train_type == "use_lora":
        flops += 6 * lora_params(text, r) * lm_tokens
    v_tokens, v_passes = num_image_tokens(vision) + 1, 3 if train_type == "none" else 1
    flops += images * (2 * c["vision_tower"] * v_tokens * v_passes
                       + 4 * vision["num_hidden_layers"] * vision["hidden_size"] * v_tokens ** 2 * v_passes)
    return flops + images * 6 * c["projector"] * num_image_tokens(vision)


def epoch_flops(text: dict, train_type: str, data: Dataset) -> float:
    """One epoch, every sample taken at the dataset's mean length (attention is a few % of the total here,
    so its n^2 barely cares)."""
    return data.samples * sample_flops(text, train_type, data.tokens_per_sample, data.with_image / data.samples)


def measured_mfu(results: dict, run: str, peak_tflops: float, mode: str = "packed") -> float:
    """MFU of a recorded `benchmarks.packing` run against `peak_tflops`: the benchmark divides the same
    useful FLOPs by the matmul rate it measured, so rescale to the data-sheet peak."""
    t = results[run]["throughput"]
    return t["modes"][mode]["mfu"] * t["matmul_tflops"] / peak_tflops


def train_hours(flops: float, gpus: int, peak_tflops: float, mfu: float) -> float:
    """Hours at `mfu` of the peak on every GPU (data parallel, communication hidden behind compute)."""
    return flops / (gpus * peak_tflops * 1e12 * mfu) / 3600


# LLaVA-1.5-7B on 8 A100s, haotian-liu/LLaVA README: pretraining on LCS-558K "around 3.5 hours", visual
# instruction tuning on the 665K mix "around 10 hours" (CLIP-L/336 + Vicuna-7B, gradient checkpointing on in
# scripts/v1_5/pretrain.sh and finetune.sh). Its full finetune keeps CLIP frozen: the course's freeze_vision.
LLAVA_1_5_HOURS = {("pretrain", "LLaVA-Pretrain LCS-558K"): 3.5, ("freeze_vision", "llava_v1_5_mix665k"): 10.0}
# lmsys/vicuna-7b-v1.5's config.json (Llama-2-7B's shapes), for that comparison only.
VICUNA_7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=32, vocab_size=32000, tie_word_embeddings=False)


def llava_1_5_check(mfu: float, gpus: int = 8, peak_tflops: float = PEAK_TFLOPS["A100"]) -> list[dict]:
    """Our hours for LLaVA-1.5-7B's two stages (Vicuna-7B's shapes) next to the hours its README reports."""
    rows = []
    for (train_type, name), reported in LLAVA_1_5_HOURS.items():
        hours = train_hours(epoch_flops(VICUNA_7B, train_type, DATASETS[name]), gpus, peak_tflops, mfu)
        rows.append({"stage": train_type, "data": name, "ours (h)": round(hours, 1), "LLaVA-1.5 README (h)": reported,
                     "ours / reported": round(hours / reported, 2)})
    return rows


# --- Cross-check: the memory model against peaks measured on an H200 -------------------------------------

def benchmark_peaks(results: dict, runs: tuple[str, ...]) -> list[dict]:
    """The activation model plus the benchmark's model states (pure bf16 AdamW: weights, gradients, two
    moments, 8 bytes per parameter) for the fullest step of each recorded run, against its measured peak."""
    from course_lib.data.collators import first_fit_decreasing
    from course_lib.lessons import speed

    rows = []
    for run in runs:
        t = results[run]["throughput"]
        g = speed.GEOMETRIES[t["geometry"]]
        items = speed.make_samples(g, t["samples"], seed=0)  # the benchmark's own samples (seed 0)
        lengths = [len(it["input_ids"]) for it in items]
        images = [0 if it.get("pixel_values") is None else len(it["pixel_values"]) for it in items]
        steps = speed.packed_batches(items, g.row_tokens, t["rows_per_step"], seed=0)
        worst = 0.0
        for step in steps:
            bins = first_fit_decreasing([lengths[k] for k in step], g.row_tokens)
            tokens = len(bins) * max(sum(lengths[step[k]] for k in b) for b in bins)  # rows padded to the fullest
            worst = max(worst, activation_gib(g.text, "none", tokens, sum(images[k] for k in step),
                                              t["gradient_checkpointing"], g.vision))
        states = 8 * sum(param_counts(g.text, g.vision).values()) / 2 ** 30
        measured = t["modes"]["packed"]["peak_memory_gb"]
        rows.append({"run": run, "model states GiB": round(states, 1), "activations GiB": round(worst, 1),
                     "estimate GiB": round(states + worst, 1), "measured GiB": round(measured, 1),
                     "estimate / measured": round((states + worst) / measured, 2)})
    return rows


# --- The plan: one row per model size and stage / train type -------------------------------------------

def stage_of(train_type: str) -> str:
    return "pretrain" if train_type == "pretrain" else "finetune"


def memory_row(size: str, train_type: str, data: Dataset, r: int = LORA_R) -> dict:
    """GiB per GPU for one micro-batch of `MICRO_BATCH` samples of mean length (what `--packing true` feeds;
    a padded batch holds its longest sample times the batch): model states by ZeRO stage and GPU count,
    activations without and with gradient checkpointing, and the total the course's ZeRO-2 on 8 GPUs needs."""
    text = QWEN2_5[SIZES[size]]
    total, trainable = total_and_trainable(text, train_type, r)
    batch = MICRO_BATCH[stage_of(train_type)]
    tokens, images = batch * data.tokens_per_sample, batch * data.with_image / data.samples
    largest = text["vocab_size"] * text["hidden_size"]  # the embedding: ZeRO-3 gathers it whole
    states = {"ZeRO-2, 1 GPU": model_state_gib(total, trainable, 1, 2),
              "ZeRO-2, 8 GPUs": model_state_gib(total, trainable, 8, 2),
              "ZeRO-3, 8 GPUs": model_state_gib(total, trainable, 8, 3, largest)}
    act = {gc: activation_gib(text, train_type, tokens, images, gc, r=r) for gc in (False, True)}
    return {"model": f"CLIP-L/336 + Qwen2.5-{size}", "train type": train_type, "trainable": trainable / total,
            **states, "activations": act[False], "activations, checkpointed": act[True],
            "total, ZeRO-2, 8 GPUs, checkpointed": states["ZeRO-2, 8 GPUs"] + act[True]}


def time_row(size: str, train_type: str, data: Dataset, mfu: float) -> dict:
    """Hours for one epoch of `data` on 1 and 8 GPUs of each peak in `PEAK_TFLOPS`, at `mfu` of that peak."""
    flops = epoch_flops(QWEN2_5[SIZES[size]], train_type, data)
    row = {"model": f"CLIP-L/336 + Qwen2.5-{size}", "train type": train_type, "data": data.name,
           "tokens (B)": data.samples * data.tokens_per_sample / 1e9, "PFLOP": flops / 1e15, "MFU": mfu}
    for gpu, peak in PEAK_TFLOPS.items():
        for n in (1, 8):
            row[f"{n} x {gpu} (h)"] = train_hours(flops, n, peak, mfu)
    return row


def real_commands(size: str = "7B", coco_dir: str = "/data/coco/train2017") -> list[str]:
    """From the repository root, with notebook 00's paths: build, prepare, stage 1, stage 2 (use_lora).
    LLaVA-1.5's micro-batches on 8 GPUs give its global batches (256, 128); on 1 GPU raise
    --gradient_accumulation_steps to 8 to keep them."""
    tag = size.lower().replace(".", "_")
    common = ("--bf16 true --gradient_checkpointing true --packing true --model_max_length 2048 "
              "--dataloader_num_workers 4 --report_to tensorboard")
    return [
        f"python -m course_lib.build --vision openai/clip-vit-large-patch14-336 --llm {SIZES[size]} "
        f"--out runs/empty_llava_{tag}",
        "python -m course_lib.prepare cc3m --output_dir data/LLaVA-CC3M-Pretrain-595K",
        f"python -m course_lib.prepare llava_instruct --output_dir data/llava_instruct --coco_dir {coco_dir}",
        f"NUM_GPUS=8 bash run_zero2.sh --stage pretrain --model_name_or_path runs/empty_llava_{tag} "
        f"--data_path data/LLaVA-CC3M-Pretrain-595K --output_dir runs/pretrain_{tag} "
        f"--per_device_train_batch_size {MICRO_BATCH['pretrain']} --gradient_accumulation_steps 1 "
        f"--learning_rate 1e-3 --num_train_epochs 1 {common} --save_strategy steps --save_steps 500 "
        "--save_total_limit 1",
        f"NUM_GPUS=8 bash run_zero2.sh --stage finetune --train_type use_lora --model_name_or_path runs/pretrain_{tag} "
        "--data_path data/llava_instruct/llava_instruct_150k.json --image_folder data/llava_instruct/images "
        f"--output_dir runs/lora_{tag} --per_device_train_batch_size {MICRO_BATCH['finetune']} "
        f"--gradient_accumulation_steps 1 --learning_rate 2e-4 --projector_lr 2e-5 --num_train_epochs 1 {common} "
        "--save_strategy epoch",
    ]
