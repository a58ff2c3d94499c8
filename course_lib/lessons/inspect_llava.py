"""Look inside the tiny world and an empty LLaVA: the tables and checks of notebooks 00 and 01.

Everything here reads what is on disk or in memory at run time (configs, tokenizers, tensors), so the
notebooks print numbers that stay true when the tiny world changes. The only literals are the real
checkpoints' configs in `REAL_VISION` and `REAL_LLMS`, which cannot be read offline.
"""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from course_lib.build import llm_config_of, vision_config_of
from course_lib.data.image_tokens import num_image_tokens
from course_lib.data.records import IMAGE_TOKEN
from course_lib.model.geometry import CLIP_L_336, QWEN2_5, QWEN2_5_TOKENIZER_LEN
from course_lib.world.backbones import TinyWorld

if TYPE_CHECKING:
    from transformers import LlavaForConditionalGeneration, PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

# The tour's real models: CLIP-L/336 with Qwen2.5-0.5B and 7B (the shapes live in model/geometry.py).
REAL_VISION = CLIP_L_336
REAL_LLMS = {name: QWEN2_5[name] for name in ("Qwen/Qwen2.5-0.5B-Instruct", "Qwen/Qwen2.5-7B-Instruct")}

VISION_FIELDS = ("image_size", "patch_size", "hidden_size", "num_hidden_layers", "num_attention_heads")
LLM_FIELDS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
              "intermediate_size", "vocab_size", "tie_word_embeddings")
TOKEN_MEANING = {
    "<|endoftext|>": "end of a document; Qwen's padding token",
    "<|im_start|>": "opens a turn; the role name follows",
    "<|im_end|>": "closes a turn; the Instruct model's eos, so the answer's last token",
    IMAGE_TOKEN: "placeholder the processor expands into the image tokens",
}

# The course, one row per notebook, with the `course_lib` modules each one teaches.
COURSE = [
    ("00_orientation", "the map of the course; the tiny world vs the real models; special tokens and "
     "chat template", "world.backbones, world.scenes, lessons.plots, model.chat_template, lessons.inspect_llava"),
    ("01_build_llava", "an empty LLaVA from CLIP + Qwen2, step by step; parameter table; image tokens; "
     "language ability kept; save and reload", "build, model.parameters, data.image_tokens, lessons.inspect_llava"),
    ("02_data", "the LLaVA data format: reading the three conversation formats, checking a dataset, "
     "opening images safely", "data.records, data.validate, data.images, world.broken, prepare"),
    ("03_token_splicing_and_masks", "from a conversation to input_ids and labels: plain vs chat template, "
     "image tokens, answers-only loss, padding", "data.labels, data.image_tokens, data.dataset, data.collators"),
    ("04_pretrain", "stage 1: train the projector only, on captions, with run_zero2.sh (DeepSpeed ZeRO-2)",
     "train, training.recipes, training.trainable, training.launch, lessons.scoreboard"),
    ("05_finetune", "stage 2: instruction tuning with train type use_lora / freeze_vision / none; merging "
     "LoRA", "train, training.trainable, model.lora, training.checkpoints, merge, lessons.scoreboard"),
    ("06_compare_train_types", "the train types side by side: accuracy per question type, cost",
     "eval, training.recipes, training.runs, lessons.scoreboard, lessons.plots"),
    ("07_chat_demo", "chat with a trained LLaVA about images, in code and in a widget; serve it with vLLM and ask "
     "through the OpenAI client", "serving.loading, serving.generation, chat, serving.widgets, serve"),
    ("08_speed", "padding vs packing measured, attention backends, ZeRO-2 memory, the data loader, cost growth",
     "lessons.speed, data.collators, data.sampler, training.zero"),
    ("09_design_patterns", "ways to join vision and language: CLIP's loss, projectors, Q-Former, pixel shuffle, "
     "tiling", "lessons.clip, lessons.design, model.projectors, data.tiling"),
    ("10_real_gpus", "real GPUs: memory per GPU and training time by stage, train type, model size and ZeRO stage; "
     "FlashAttention-2, bf16 and the exact commands", "lessons.gpu_plan, training.zero, lessons.speed"),
    ("11_recap", "the recap: what each notebook built, the numbers your runs produced, where to go next, a reading "
     "list", "lessons.recap"),
]


def course_map(notebooks_dir: str | Path | None = None) -> list[dict]:
    """The course table. With `notebooks_dir`, it also says which notebooks are there yet, and marks
    the modules this copy of `course_lib` does not have yet."""
    rows = []
    for name, teaches, modules in COURSE:
        row = {"notebook": name, "teaches": teaches, "course_lib modules": modules}
        if notebooks_dir is not None:
            row["course_lib modules"] = ", ".join(
                m if importlib.util.find_spec(f"course_lib.{m}") else f"{m} (to come)" for m in modules.split(", "))
            row["status"] = "here" if (Path(notebooks_dir) / f"{name}.ipynb").is_file() else "to come"
        rows.append(row)
    return rows


def fields(config: PretrainedConfig, names: tuple[str, ...]) -> dict:
    """The named fields of a config, for printing."""
    return {n: getattr(config, n) for n in names}


def count_params(config: PretrainedConfig) -> int:
    """Parameters of a CLIP vision tower or a causal LM, built on the meta device (no memory used)."""
    from transformers import AutoModelForCausalLM, CLIPVisionModel

    with torch.device("meta"):
        if config.model_type == "clip_vision_model":
            model = CLIPVisionModel(config)
        else:
            model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())  # tied tensors are counted once


def projector_params(vision_width: int, llm_width: int) -> int:
    """LLaVA-1.5's 2-layer MLP: Linear(vision, llm) -> GELU -> Linear(llm, llm), with biases."""
    return vision_width * llm_width + llm_width + llm_width * llm_width + llm_width


TABLE_ROWS = ["image size (px)", "patch size (px)", "image tokens per image", "vision width", "vision depth (layers)",
              "vision heads", "vision tower parameters", "LM width", "LM depth (layers)", "LM heads (query / kv)",
              "LM MLP width", "LM embedding rows", "tokenizer size", "spare rows after adding <image>",
              "LM parameters", "projector parameters"]


def _column(vision, llm, tokenizer_len: int) -> list:
    """One column of `tiny_vs_real`, in the order of TABLE_ROWS."""
    return [vision.image_size, vision.patch_size, num_image_tokens(vision), vision.hidden_size,
            vision.num_hidden_layers, vision.num_attention_heads, count_params(vision), llm.hidden_size,
            llm.num_hidden_layers, f"{llm.num_attention_heads} / {llm.num_key_value_heads}",
            llm.intermediate_size, llm.vocab_size, tokenizer_len, llm.vocab_size - tokenizer_len - 1,
            count_params(llm), projector_params(vision.hidden_size, llm.hidden_size)]


def tiny_vs_real(world: TinyWorld) -> list[dict]:
    """The tiny backbones (read from their saved configs) next to CLIP-L/336 + Qwen2.5-0.5B / 7B."""
    from transformers import AutoTokenizer, CLIPVisionConfig, Qwen2Config

    columns = {"tiny world": _column(vision_config_of(str(world.clip)), llm_config_of(str(world.llm)),
                                     len(AutoTokenizer.from_pretrained(world.llm)))}
    real_vision = CLIPVisionConfig(**REAL_VISION)
    for name, cfg in REAL_LLMS.items():
        columns[f"CLIP-L/336 + {name.split('/')[1]}"] = _column(real_vision, Qwen2Config(**cfg),
                                                              QWEN2_5_TOKENIZER_LEN)
    return [{"": row, **{k: col[i] for k, col in columns.items()}} for i, row in enumerate(TABLE_ROWS)]


def world_summary(world: TinyWorld) -> list[dict]:
    """One row per data part: its JSON file, how many records, and how many images each carries."""
    rows = []
    for part, file, images in (("pretrain", "chat.json", "images_dl"), ("instruct", "instruct.json", "images"),
                               ("eval", "eval.json", "images")):
        records = json.loads((world.data / part / file).read_text())
        n = [len(r["image"]) if isinstance(r.get("image"), list) else int("image" in r) for r in records]
        rows.append({"part": part, "file": f"{part}/{file}", "records": len(records),
                     "text-only": n.count(0), "1 image": n.count(1), "2 images": n.count(2),
                     "image files": len(list((world.data / part / images).iterdir()))})
    return rows


def special_tokens(tokenizer: PreTrainedTokenizerBase) -> list[dict]:
    """The tokenizer's added special tokens with their ids, the roles it gives them and what they mean."""
    roles = {"bos": tokenizer.bos_token, "eos": tokenizer.eos_token, "pad": tokenizer.pad_token}
    return [{"token": str(tok), "id": i, "role": ", ".join(r for r, t in roles.items() if t == str(tok)) or "-",
             "meaning": TOKEN_MEANING.get(str(tok), "")}
            for i, tok in sorted(tokenizer.added_tokens_decoder.items())]


def collapse_image_tokens(text: str, image_token: str = IMAGE_TOKEN) -> str:
    """Write each run of image tokens as `<image>×N`, so an expanded prompt fits on a screen."""
    runs = re.compile(f"(?:{re.escape(image_token)})+")
    return runs.sub(lambda m: f"{image_token}×{len(m.group()) // len(image_token)}", text)


@torch.no_grad()
def image_path(model: LlavaForConditionalGeneration, pixel_values: torch.Tensor) -> dict[str, torch.Tensor]:
    """The tensors along LLaVA's image path, as transformers' Llava computes them, step by step."""
    cfg = model.config
    hidden = model.model.vision_tower(pixel_values, output_hidden_states=True).hidden_states
    layer = hidden[cfg.vision_feature_layer]  # -2: the penultimate layer, as LLaVA-1.5
    # "default" drops CLS, the first token (LLaVA's `image_features[:, 1:]`); "full" keeps it.
    patches = layer[:, 1:] if cfg.vision_feature_select_strategy == "default" else layer
    return {"pixel_values": pixel_values,
            f"vision hidden states ({len(hidden)} = embeddings + layers), each": hidden[-1],
            f"layer {cfg.vision_feature_layer} (CLS + patches)": layer,
            "patches (CLS dropped)": patches,
            "image tokens (after the projector)": model.model.multi_modal_projector(patches)}


def chat_inputs(tokenizer: PreTrainedTokenizerBase, question: str) -> dict[str, torch.Tensor]:
    """A one-turn, text-only chat prompt, ready for the model (the assistant's turn is opened)."""
    msgs = [{"role": "user", "content": question}]
    return tokenizer.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)


@torch.no_grad()
def max_logit_diff(a: PreTrainedModel, b: PreTrainedModel, inputs: dict[str, torch.Tensor]) -> float:
    """Largest absolute difference between two models' logits on the same inputs."""
    return (a(**inputs).logits - b(**inputs).logits).abs().max().item()


@torch.no_grad()
def greedy_answer(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, question: str,
                  max_new_tokens: int = 8) -> str:
    """The model's greedy answer to a text-only question (works for the LLM and the LLaVA alike)."""
    inputs = chat_inputs(tokenizer, question).to(model.device)
    # Qwen2.5's generation_config samples (temperature, top_p, top_k); clearing them avoids warnings.
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, temperature=None, top_p=None,
                         top_k=None)
    return tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


def list_files(folder: str | Path) -> list[dict]:
    """The files of a saved checkpoint folder with their sizes."""
    return [{"file": f.name, "KiB": round(f.stat().st_size / 1024, 1)}
            for f in sorted(Path(folder).iterdir()) if f.is_file()]
