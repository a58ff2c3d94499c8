"""Build an empty LLaVA from any CLIP and any Qwen2/Qwen2.5 checkpoint, tiny or real.

    python -m course_lib.build --vision tiny --llm tiny --out runs/empty_llava
    python -m course_lib.build --vision openai/clip-vit-large-patch14-336 \
        --llm Qwen/Qwen2.5-0.5B-Instruct --out runs/empty_llava_real

"Empty" means only the projector is new: the vision tower and the language model keep their
pretrained weights, copied into transformers' current Llava layout (`model.model.vision_tower`,
`model.model.language_model`, `model.lm_head`). The result is a standard HF Llava checkpoint.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from course_lib.data.image_tokens import num_image_tokens
from course_lib.data.records import IMAGE_TOKEN
from course_lib.model.chat_template import LLAVA_QWEN_TEMPLATE
from course_lib.model.layout import save_llava
from course_lib.util.cli import Parser, UserError, command, first_line
from course_lib.util.files import atomic_write_json, check_writable, fingerprint
from course_lib.util.quiet import quiet_transformers

if TYPE_CHECKING:
    from transformers import CLIPVisionConfig, LlavaForConditionalGeneration, LlavaProcessor, PretrainedConfig

SUPPORTED_LLMS = ("qwen2",)
BUILT_FROM = "built_from.json"  # the backbones an empty LLaVA was built from (`built_from`)


class BuildError(UserError, ValueError):
    """A user-facing problem with the inputs of `build_llava`: printed as one line by the CLI."""


@dataclass(frozen=True)
class Sources:
    vision: str
    llm: str


def resolve_sources(vision: str, llm: str) -> Sources:
    """Map the word `tiny` to the tiny world's backbones, and `clip-l-336-shaped` / `qwen2.5-0.5b-shaped` to the
    real-shaped world's (each built on first use); keep paths and hub ids."""
    if "tiny" in (vision, llm):
        from course_lib.world import ensure_tiny_world

        world = ensure_tiny_world()
        vision = str(world.clip) if vision == "tiny" else vision
        llm = str(world.llm) if llm == "tiny" else llm
    from course_lib.world.real_shaped import resolve

    return Sources(resolve(vision), resolve(llm))


def built_from(vision: str, llm: str, seed: int = 0, dtype: str = "auto") -> dict:
    """What an empty LLaVA is keyed by (`course_lib.training.runs.build_once`): its backbones' fingerprints,
    after `tiny` is resolved, its seed and its dtype."""
    src = resolve_sources(vision, llm)
    return {"vision": fingerprint(src.vision), "llm": fingerprint(src.llm), "seed": seed, "dtype": dtype}


def _load_config(name: str, what: str, expected: str):
    from transformers import AutoConfig

    looks_local = name.startswith(("/", "./", "../", "~")) or name.count("/") > 1
    if looks_local and not Path(name).expanduser().exists():
        raise BuildError(f"--{what} {name}: no such folder; expected a local {expected} checkpoint or a hub id")
    if Path(name).exists() and not (Path(name) / "config.json").is_file():
        raise BuildError(f"--{what} {name}: folder has no config.json; expected a {expected} checkpoint")
    try:
        return AutoConfig.from_pretrained(name)  # never trust_remote_code: these are stock architectures
    except (OSError, ValueError) as err:
        raise BuildError(f"--{what} {name}: cannot load a {expected} config ({first_line(err)})") from None


def vision_config_of(name: str) -> CLIPVisionConfig:
    """The CLIP vision config of a full CLIP checkpoint or a CLIP vision-only checkpoint."""
    config = _load_config(name, "vision", "CLIP (model_type 'clip')")
    if config.model_type == "clip":
        return config.vision_config
    if config.model_type == "clip_vision_model":
        return config
    raise BuildError(f"--vision {name}: expected a CLIP checkpoint (model_type 'clip'), "
                     f"got model_type '{config.model_type}'")


def llm_config_of(name: str) -> PretrainedConfig:
    config = _load_config(name, "llm", "Qwen2/Qwen2.5 (model_type 'qwen2')")
    if config.model_type not in SUPPORTED_LLMS:
        raise BuildError(f"--llm {name}: expected a Qwen2/Qwen2.5 causal LM (model_type 'qwen2'), "
                         f"got model_type '{config.model_type}'")
    return config


def _copy_weights(dst: nn.Module, src: nn.Module) -> None:
    """Load `src` into `dst` (built on the meta device), strictly, then carry non-persistent buffers.

    `assign=True` moves the tensors instead of copying them, so a 7B model is never held twice.
    Buffers such as rotary `inv_freq` or CLIP's `position_ids` are not in a state dict.
    """
    dst.load_state_dict(src.state_dict(), strict=True, assign=True)
    for name, buf in src.named_buffers():
        owner_name, _, attr = name.rpartition(".")
        owner = dst.get_submodule(owner_name)
        owner.register_buffer(attr, buf, persistent=attr not in owner._non_persistent_buffers_set)


def _torch_dtype(name: str, config) -> torch.dtype:
    """`auto` keeps the LLM checkpoint's own dtype (bf16 for Qwen2.5), else fp32."""
    if name != "auto":
        return getattr(torch, name)
    found = getattr(config, "dtype", None) or torch.float32
    return getattr(torch, found) if isinstance(found, str) else found


def build_llava(vision: str, llm: str, out: str | Path | None = None, *, seed: int = 0,
                dtype: str = "auto") -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """Return (model, processor) for an empty LLaVA; save both to `out` as safetensors if given."""
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        CLIPImageProcessor,
        CLIPVisionModel,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    src = resolve_sources(vision, llm)
    vision_config = vision_config_of(src.vision)
    text_config = llm_config_of(src.llm)

    tokenizer = AutoTokenizer.from_pretrained(src.llm)
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        # Added to, not replacing, the checkpoint's own special tokens (Qwen2.5 lists 13 more, <|im_start|> among them).
        tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]}, replace_extra_special_tokens=False)
    tokenizer.pad_token = "<|endoftext|>"  # Qwen's padding token; never <|im_end|>, which carries loss
    # The tokenizer renders what the processor renders (the training data is encoded with the tokenizer's).
    tokenizer.chat_template = LLAVA_QWEN_TEMPLATE
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)

    torch_dtype = _torch_dtype(dtype, text_config)
    llm_model = AutoModelForCausalLM.from_pretrained(src.llm, dtype=torch_dtype)
    with quiet_transformers():  # a full CLIP checkpoint has text-tower keys we mean to leave out
        clip_model = CLIPVisionModel.from_pretrained(src.vision, dtype=torch_dtype)
    if len(tokenizer) > llm_model.get_input_embeddings().num_embeddings:
        # Qwen2.5 ships spare embedding rows, so `<image>` usually fits without resizing.
        llm_model.resize_token_embeddings(len(tokenizer), mean_resizing=True)

    config = LlavaConfig(
        vision_config=vision_config,
        text_config=llm_model.config,
        image_token_index=image_token_id,
        image_seq_length=num_image_tokens(vision_config),
        # LLaVA-1.5 uses the penultimate layer's features and drops CLS (Liu et al. 2023, sec. 4).
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",  # the 2-layer MLP projector of LLaVA-1.5
        tie_word_embeddings=llm_model.config.tie_word_embeddings,
    )
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(config)
    _copy_weights(model.model.vision_tower, clip_model)
    _copy_weights(model.model.language_model, llm_model.model)
    _copy_weights(model.lm_head, llm_model.lm_head)
    if config.tie_word_embeddings:
        model.tie_weights()
    projector = model.model.multi_modal_projector.to_empty(device="cpu")
    torch.manual_seed(seed)
    for layer in projector.modules():
        if isinstance(layer, nn.Linear):
            layer.reset_parameters()  # PyTorch's default init, as in LLaVA's own nn.Sequential projector
    projector.to(torch_dtype)
    model.generation_config = llm_model.generation_config
    model.eval()

    image_processor = CLIPImageProcessor.from_pretrained(src.vision)
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=vision_config.patch_size,
        vision_feature_select_strategy="default",
        # CLIP's CLS token is an extra token; with "default" it is dropped, so 24*24 = 576 for CLIP-L/336.
        num_additional_image_tokens=1,
        chat_template=LLAVA_QWEN_TEMPLATE,
        image_token=IMAGE_TOKEN,
    )
    if out is not None:
        out = Path(out)
        save_llava(model, out)  # safetensors, in the llava-hf layout that vLLM and every transformers read
        processor.save_pretrained(out)
        # What it was built from, so that a notebook can tell it from one built on another tiny world.
        atomic_write_json(out / BUILT_FROM, built_from(vision, llm, seed, dtype), indent=1)
    return model, processor


@command
def main(argv: list[str] | None = None) -> int:
    parser = Parser(prog="python -m course_lib.build", description=__doc__.split("\n")[0])
    parser.add_argument("--vision", default="tiny", help="CLIP path, hub id, 'tiny' or 'clip-l-336-shaped'")
    parser.add_argument("--llm", default="tiny", help="Qwen2/Qwen2.5 path, hub id, 'tiny' or 'qwen2.5-0.5b-shaped'")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    args = parser.parse_args(argv)
    check_writable(args.out, "--out", folder=True)  # before minutes of loading, not after
    model, _ = build_llava(args.vision, args.llm, args.out, seed=args.seed, dtype=args.dtype)
    n = sum(p.numel() for p in model.parameters())
    print(f"saved an empty LLaVA ({n / 1e6:.2f}M parameters) to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
