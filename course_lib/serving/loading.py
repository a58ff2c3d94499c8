"""Load any trained LLaVA for inference: a full folder, a merged LoRA folder, or base + LoRA adapter.

    loaded = load_trained("runs/tiny/finetune_use_lora")   # or runs/tiny/pretrain, a merged folder, ...
    loaded = load_trained("llava-hf/llava-interleave-qwen-0.5b-hf")   # or a hub id: downloaded once, then cached
    loaded.model, loaded.processor, loaded.kind, loaded.device, loaded.dtype

A full (or merged) folder is a plain `LlavaForConditionalGeneration` checkpoint. A LoRA folder holds
PEFT's `adapter_config.json` + `adapter_model.safetensors`; its `base_model_name_or_path` names the
stage-1 folder it was trained on, and the trained projector travels inside the adapter
(`modules_to_save=["multi_modal_projector"]`). Loading follows PEFT's own path
(https://huggingface.co/docs/peft/main/en/developer_guides/checkpoint), so what we run is what trained.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from course_lib.model.partial_lora import has_partial_lora, load_partial_lora
from course_lib.util.cli import UserError, first_line
from course_lib.util.quiet import quiet_transformers

ADAPTER_CONFIG = "adapter_config.json"
PREPROCESSING_FILE = "image_preprocessing.json"  # written by course_lib.train
LLAVA_ARCHITECTURE = "LlavaForConditionalGeneration"
# What a hub download fetches: configs, chat templates, tokenizer files and safetensors weights. Never pickles.
HUB_FILES = ["*.json", "*.jinja", "*.safetensors", "*.txt", "*.model", "*.tiktoken"]

Kind = Literal["full", "lora"]


class LoadError(UserError, ValueError):
    """A trained-output folder that cannot be loaded: names the folder and what was expected."""


@dataclass
class LoadedModel:
    model: torch.nn.Module
    processor: object  # a transformers LlavaProcessor
    kind: Kind
    path: Path
    base: Path | None = None  # the base folder of a LoRA adapter
    preprocessing: dict = field(default_factory=dict)  # image_preprocessing.json: pad_to_square, image_tiling
    hub_id: str | None = None  # the hub repository it was downloaded from, if it was

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def name(self) -> str:
        return self.hub_id or self.path.name


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


def is_llava_folder(folder: str | Path | None) -> bool:
    """Whether `folder` holds a LLaVA config.json (model_type 'llava'); False for anything unreadable."""
    try:
        return json.loads((Path(folder) / "config.json").read_text()).get("model_type") == "llava"
    except (OSError, ValueError, TypeError, AttributeError):
        return False


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
    try:
        architectures = json.loads(config.read_text()).get("architectures") or []
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as err:
        raise LoadError(f"--model {folder}: config.json is not a JSON object ({err})") from None
    if LLAVA_ARCHITECTURE not in architectures:
        raise LoadError(f"--model {folder}: config.json describes {architectures or 'no architecture'}, "
                        f"expected {LLAVA_ARCHITECTURE}")
    return "full"


def adapter_base(folder: str | Path) -> Path:
    """The base LLaVA folder a LoRA adapter names in `base_model_name_or_path`.

    Trainers write the path as they were given it, often relative to where training ran; so a relative
    path is tried from the current folder, then from the adapter's folder and its parent. Nothing else is
    guessed: a folder that merely has the same name could hold another model, and the adapter would then
    run on the wrong base without a word.
    """
    folder = Path(folder)
    from peft import PeftConfig

    try:  # PEFT's own reader of adapter_config.json (local folder: no hub access)
        base = PeftConfig.from_pretrained(str(folder)).base_model_name_or_path
    except (ValueError, TypeError, OSError) as err:  # broken JSON is a ValueError
        raise LoadError(f"{folder / ADAPTER_CONFIG}: not a readable PEFT adapter config "
                        f"({first_line(err)})") from None
    if not base:
        raise LoadError(f"{folder / ADAPTER_CONFIG}: base_model_name_or_path is empty; set it to the stage-1 "
                        "LLaVA folder the adapter was trained from (or pass base=... to load_trained)")
    given = Path(base).expanduser()
    candidates = [given] if given.is_absolute() else [given, folder / given, folder.parent / given]
    for candidate in candidates:
        if (candidate / "config.json").is_file():
            return candidate
    raise LoadError(f"{folder / ADAPTER_CONFIG}: base model {base!r} not found" + (
        "" if given.is_absolute() else " (looked from the current folder and next to the adapter)")
        + "; set base_model_name_or_path to the stage-1 LLaVA folder the adapter was trained from")


def is_hub_id(name: str | Path) -> bool:
    """Whether `name` reads as a hub repository id (`owner/name`) and is not a folder here."""
    parts = str(name).split("/")
    return (isinstance(name, str) and len(parts) == 2 and all(parts) and not name.startswith((".", "~"))
            and not Path(name).exists())


def hub_folder(repo_id: str) -> Path:
    """The local snapshot of a hub model: downloaded on first use (only HUB_FILES), then read from the hub's
    cache; offline (`HF_HUB_OFFLINE=1`), only the cache. Any failure is one LoadError line."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id=repo_id, allow_patterns=HUB_FILES))
    except Exception as err:  # noqa: BLE001 - any hub, network or cache failure becomes one readable line
        raise LoadError(f"--model {repo_id}: not a folder here, and the hub download failed ({first_line(err)}); "
                        "check the name, or download it yourself and pass its folder") from None


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

    hub_id = str(path) if is_hub_id(path) else None
    path = hub_folder(hub_id) if hub_id else Path(path)
    kind = checkpoint_kind(path)
    device = pick_device(device)
    dtype = dtype or pick_dtype(device)
    base_path = (Path(base) if base else adapter_base(path)) if kind == "lora" else None
    weights = base_path if kind == "lora" else path
    if kind == "lora" and checkpoint_kind(base_path) != "full":
        raise LoadError(f"{path}: base {base_path} is itself an adapter; expected a full LLaVA folder")
    _require_safetensors(weights, ("model.safetensors", "model.safetensors.index.json"))
    if kind == "lora":
        _require_safetensors(path, ("adapter_model.safetensors",))
    with quiet_transformers(progress_bars=False), _damaged_files_named(path):
        model = LlavaForConditionalGeneration.from_pretrained(weights, dtype=dtype, use_safetensors=True)
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
                       preprocessing=read_preprocessing(path, base_path), hub_id=hub_id)


@contextlib.contextmanager
def _damaged_files_named(path: Path) -> Iterator[None]:
    """A truncated or corrupt file (weights, JSON) becomes one LoadError naming the folder, not a traceback
    from deep inside safetensors or transformers."""
    from safetensors import SafetensorError

    try:
        yield
    except LoadError:
        raise
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise LoadError(f"--model {path}: cannot load it, a file is damaged or incomplete "
                        f"({first_line(err)})") from None


def _require_safetensors(folder: Path, names: tuple[str, ...]) -> None:
    """Safetensors only: a pickled checkpoint (pytorch_model.bin, adapter_model.bin) is refused, never read.
    An index counts only when the files it names are there (the course writes one beside a single file)."""
    def present(name: str) -> bool:
        if not name.endswith(".index.json") or not (folder / name).is_file():
            return (folder / name).is_file()
        try:
            shards = set(json.loads((folder / name).read_text())["weight_map"].values())
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return True  # damaged: loading names it
        return all((folder / shard).is_file() for shard in shards)

    if not any(present(name) for name in names):
        pickled = sorted(p.name for p in folder.glob("*.bin"))
        raise LoadError(f"{folder}: no {names[0]}" + (f" (found {', '.join(pickled)}: pickled weights are not "
                                                      "loaded; convert them to safetensors)" if pickled else ""))


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
            if any(part.startswith(("checkpoint-", ".")) or part.endswith(".stale")
                   for part in marker.parent.relative_to(root).parts):
                continue  # Trainer's checkpoints, half-written staging folders and runs set aside as stale
            with contextlib.suppress(LoadError, ValueError, OSError):
                checkpoint_kind(marker.parent)
                found.add(marker.parent)
    return sorted(found)
