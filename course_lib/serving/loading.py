"""Load any trained LLaVA for inference: a full folder, a merged LoRA folder, or base + LoRA adapter.

    loaded = load_trained("runs/tiny/finetune_use_lora")   # or runs/tiny/pretrain, a merged folder, ...
    loaded.model, loaded.processor, loaded.kind, loaded.device, loaded.dtype

A full (or merged) folder is a plain `LlavaForConditionalGeneration` checkpoint. A LoRA folder holds
PEFT's `adapter_config.json` + `adapter_model.safetensors`; its `base_model_name_or_path` names the
stage-1 folder it was trained on, and the trained projector travels inside the adapter
(`modules_to_save=["multi_modal_projector"]`). Loading follows PEFT's own path
(https://huggingface.co/docs/peft/main/en/developer_guides/checkpoint), so what we run is what trained.

Images are opened here too, bounded in pixels so a decompression bomb is refused before it is decoded.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from PIL import Image, UnidentifiedImageError

from course_lib.data.images import MAX_IMAGE_PIXELS, to_rgb
from course_lib.model.partial_lora import has_partial_lora, load_partial_lora
from course_lib.util.quiet import quiet_transformers

ADAPTER_CONFIG = "adapter_config.json"
PREPROCESSING_FILE = "image_preprocessing.json"  # written by course_lib.train
LLAVA_ARCHITECTURE = "LlavaForConditionalGeneration"

Kind = Literal["full", "lora"]


class LoadError(ValueError):
    """A trained-output folder that cannot be loaded: names the folder and what was expected."""


class ImageError(ValueError):
    """An image that cannot be used: names the file and says why, in one line."""


@dataclass
class LoadedModel:
    model: torch.nn.Module
    processor: object  # a transformers LlavaProcessor
    kind: Kind
    path: Path
    base: Path | None = None  # the base folder of a LoRA adapter
    preprocessing: dict = field(default_factory=dict)  # image_preprocessing.json: pad_to_square, image_tiling

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def name(self) -> str:
        return self.path.name


def pick_device(device: str | torch.device | None = None) -> torch.device:
    """The given device, else the best one present: cuda, then mps, then cpu."""
    if device is not None:
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def pick_dtype(device: torch.device) -> torch.dtype:
    """bf16 on CUDA GPUs that have it (Ampere and later), fp16 on older ones, fp32 elsewhere.

    LLaVA itself runs inference in half precision on GPUs (llava/model/builder.py); CPUs and MPS lack
    fast bf16 kernels, and fp32 keeps CPU outputs equal to the source LLM's.
    """
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def checkpoint_kind(folder: str | Path) -> Kind:
    """`lora` for a PEFT adapter folder, `full` for a Llava checkpoint (merged ones included)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise LoadError(f"--model {folder}: no such folder; expected a trained LLaVA output folder")
    if (folder / ADAPTER_CONFIG).is_file():
        return "lora"
    config = folder / "config.json"
    if not config.is_file():
        raise LoadError(f"--model {folder}: neither config.json nor {ADAPTER_CONFIG} found; "
                        "expected a LLaVA checkpoint or a LoRA adapter folder")
    architectures = json.loads(config.read_text()).get("architectures") or []
    if LLAVA_ARCHITECTURE not in architectures:
        raise LoadError(f"--model {folder}: config.json describes {architectures or 'no architecture'}, "
                        f"expected {LLAVA_ARCHITECTURE}")
    return "full"


def adapter_base(folder: str | Path) -> Path:
    """The base LLaVA folder a LoRA adapter names in `base_model_name_or_path`.

    Trainers write the path as they were given it, often relative to where training ran; so it is
    tried as given (absolute, or from the current folder), then next to the adapter.
    """
    folder = Path(folder)
    base = json.loads((folder / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path")
    if not base:
        raise LoadError(f"{folder / ADAPTER_CONFIG}: base_model_name_or_path is empty; set it to the stage-1 "
                        "LLaVA folder the adapter was trained from (or pass base=... to load_trained)")
    candidates = [Path(base).expanduser(), folder / base, folder.parent / base, folder.parent / Path(base).name]
    for candidate in candidates:
        if (candidate / "config.json").is_file():
            return candidate
    raise LoadError(f"{folder / ADAPTER_CONFIG}: base model {base!r} not found (looked in the current folder "
                    f"and next to the adapter); expected the stage-1 LLaVA folder it was trained from")


def _has_processor(folder: Path) -> bool:
    return (folder / "processor_config.json").is_file() or (folder / "preprocessor_config.json").is_file()


def load_trained(
    path: str | Path,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    *,
    base: str | Path | None = None,
    merge_lora: bool = False,
) -> LoadedModel:
    """Load a full, merged or LoRA training output, ready for `generate`, on the best device.

    `base` overrides a LoRA adapter's own `base_model_name_or_path`. `merge_lora=True` folds the
    adapter into the weights (faster generation, same outputs up to rounding).
    """
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    path = Path(path)
    kind = checkpoint_kind(path)
    device = pick_device(device)
    dtype = dtype or pick_dtype(device)
    base_path = (Path(base) if base else adapter_base(path)) if kind == "lora" else None
    weights = base_path if kind == "lora" else path
    if kind == "lora" and checkpoint_kind(base_path) != "full":
        raise LoadError(f"{path}: base {base_path} is itself an adapter; expected a full LLaVA folder")
    with quiet_transformers(progress_bars=False):
        model = LlavaForConditionalGeneration.from_pretrained(weights, dtype=dtype)  # safetensors only
        if kind == "lora":
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, path)
            if merge_lora:
                model = model.merge_and_unload()
        elif has_partial_lora(path):
            if merge_lora:
                raise LoadError(f"{path}: Partial LoRA acts only at image positions and cannot be merged")
            load_partial_lora(model, path)
        processor = AutoProcessor.from_pretrained(path if _has_processor(path) else weights)
    model.to(device).eval()
    return LoadedModel(model=model, processor=processor, kind=kind, path=path, base=base_path,
                       preprocessing=read_preprocessing(path, base_path))


def read_preprocessing(path: Path, base: Path | None = None) -> dict:
    """How training prepared images (`image_preprocessing.json`, written by course_lib.train), so that
    inference does the same: {"pad_to_square": bool, "image_tiling": max tiles or 0}. Missing: defaults."""
    for folder in (path, base):
        if folder is not None and (folder / PREPROCESSING_FILE).is_file():
            try:
                found = json.loads((folder / PREPROCESSING_FILE).read_text())
            except json.JSONDecodeError as err:
                raise LoadError(f"{folder / PREPROCESSING_FILE}: not valid JSON ({err})") from None
            return {"pad_to_square": bool(found.get("pad_to_square", False)),
                    "image_tiling": int(found.get("image_tiling", 0))}
    return {"pad_to_square": False, "image_tiling": 0}


def find_models(*roots: str | Path) -> list[Path]:
    """Trained outputs under the given folders (e.g. `runs/`), sorted: any folder `load_trained` takes."""
    found = set()
    for root in map(Path, roots):
        if not root.is_dir():
            continue
        for marker in (*root.rglob("config.json"), *root.rglob(ADAPTER_CONFIG)):
            if any(part.startswith(("checkpoint-", ".")) for part in marker.parent.relative_to(root).parts):
                continue  # Trainer's checkpoints and half-written staging folders, not final outputs
            with contextlib.suppress(LoadError, ValueError, OSError):
                checkpoint_kind(marker.parent)
                found.add(marker.parent)
    return sorted(found)


def load_image(source: str | Path | bytes | Image.Image, name: str | None = None,
               max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """An RGB image from a path, raw bytes or a PIL image; refuses non-images, corrupt files and bombs.

    The size is read from the header before any pixel is decoded, so a 100k x 100k PNG costs nothing.
    The pixel limit and the RGB conversion are training's (`images`); the errors name uploads too.
    """
    if isinstance(source, Image.Image):
        name = name or "image"
        image = source
    else:
        name = name or (str(source) if isinstance(source, str | Path) else "uploaded image")
        if isinstance(source, str | Path) and not os.path.isfile(source):
            raise ImageError(f"{name}: no such file")
        try:
            with warnings.catch_warnings():  # Pillow warns from 89 MP on; the size is checked below instead
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                image = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
        except Image.DecompressionBombError:
            raise ImageError(f"{name}: too large (more than {max_pixels:,} pixels)") from None
        except (UnidentifiedImageError, OSError):
            raise ImageError(f"{name}: not an image Pillow can read (expected PNG, JPEG, WebP, ...)") from None
    width, height = image.size
    if width * height > max_pixels:
        image.close()
        raise ImageError(f"{name}: too large ({width}x{height} = {width * height:,} pixels, "
                         f"the limit is {max_pixels:,})")
    try:
        image.load()
        return to_rgb(image)  # as training does: transparency on white, 16-bit scaled
    except Exception as err:  # truncated data surfaces as OSError, SyntaxError, ValueError, ...
        raise ImageError(f"{name}: corrupt or truncated image ({type(err).__name__})") from None


# --- prompts and generation ----------------------------------------------------------------------------


@dataclass(frozen=True)
class GenerationSettings:
    """What `generate` is asked for, on top of the model's generation_config. Greedy by default."""

    max_new_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    do_sample: bool = False

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={self.max_new_tokens}: expected at least 1")
        if self.do_sample and self.temperature <= 0:
            raise ValueError(f"temperature={self.temperature}: expected > 0 when sampling (or use greedy)")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p}: expected a value in (0, 1]")

    def generate_kwargs(self) -> dict:
        if self.do_sample:
            return {"max_new_tokens": self.max_new_tokens, "do_sample": True, "temperature": self.temperature,
                    "top_p": self.top_p}
        # Qwen2.5's generation_config asks for sampling (temperature 0.7, top_p 0.8, top_k 20); greedy
        # search ignores those, and clearing them keeps transformers from warning so on every call.
        return {"max_new_tokens": self.max_new_tokens, "do_sample": False, "temperature": None, "top_p": None,
                "top_k": None}


def user_message(text: str, n_images: int = 0) -> dict:
    """A user turn: its images first, each rendered as `<image>\\n`, then the text (LLaVA's layout)."""
    return {"role": "user", "content": [{"type": "image"}] * n_images + [{"type": "text", "text": text}]}


def assistant_message(text: str) -> dict:
    return {"role": "assistant", "content": [{"type": "text", "text": text}]}


def prepare_inputs(processor, conversations: Sequence[list[dict]], images: Sequence[Sequence[Image.Image]],
                   device: torch.device, dtype: torch.dtype, pad_to_square: bool = False, image_tiling: int = 0):
    """Token ids and pixels for a batch of conversations, left-padded so generation continues each one.

    `pad_to_square` and `image_tiling` must be what the model was trained with (`LoadedModel.preprocessing`):
    tiled, each image becomes its tiles + thumbnail, and its `<image>` as many placeholders.
    """
    from course_lib.data.tiling import expand_placeholders, prepare_images

    texts = [processor.apply_chat_template(c, add_generation_prompt=True) for c in conversations]
    prepared = [prepare_images(list(group), processor, pad_to_square, image_tiling) for group in images]
    if image_tiling:
        texts = [expand_placeholders(text, counts, processor.image_token) for text, (_, counts) in zip(texts, prepared)]
    images = [group for group, _ in prepared]
    flat = [image for group in images for image in group]
    inputs = processor(text=texts, images=flat or None, padding=True, padding_side="left", return_tensors="pt")
    return inputs.to(device, dtype=dtype)  # casts pixel_values only; token ids stay integers


def generate_replies(loaded: LoadedModel, conversations: Sequence[list[dict]],
                     images: Sequence[Sequence[Image.Image]], settings: GenerationSettings | None = None) -> list[str]:
    """One answer per conversation, generated as one batch."""
    settings = settings or GenerationSettings()
    model, tokenizer = loaded.model, loaded.processor.tokenizer
    inputs = prepare_inputs(loaded.processor, conversations, images, loaded.device, loaded.dtype,
                            **loaded.preprocessing)
    with torch.inference_mode():
        out = model.generate(**inputs, **settings.generate_kwargs())
    return tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
