"""Loading trained outputs: full, LoRA (base found from the adapter) and merged load and agree; images are bounded."""

import json
import shutil
import struct
import zlib

import pytest
import torch
from PIL import Image
from transformers import AutoProcessor, LlavaForConditionalGeneration

from course_lib.chat import Chat
from course_lib.data.images import ImageError, load_image
from course_lib.serving.generation import prepare_inputs, user_message
from course_lib.serving.loading import (
    LoadError,
    adapter_base,
    checkpoint_kind,
    find_models,
    load_trained,
    pick_device,
    pick_dtype,
)

LORA_TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"


def png_header(width: int, height: int) -> bytes:
    """A tiny PNG file that claims `width` x `height` pixels: a decompression bomb in 60 bytes."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def write_bad_images(folder, good_png):
    """Files that must be refused, with the words their error must contain."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "notes.txt").write_text("not an image at all")
    (folder / "broken.png").write_bytes(good_png.read_bytes()[:80])  # a valid header, then truncated
    (folder / "huge.png").write_bytes(png_header(10_000, 10_000))  # 100 MP: above our limit, Pillow only warns
    (folder / "bomb.png").write_bytes(png_header(100_000, 100_000))  # 10 GP: Pillow's own guard fires
    return {
        folder / "missing.png": "no such file",
        folder / "notes.txt": "not an image",
        folder / "broken.png": "corrupt or truncated",
        folder / "huge.png": "too large",
        folder / "bomb.png": "too large",
    }


def _perturb(model: torch.nn.Module, names: tuple[str, ...], seed: int, scale: float = 0.05) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if any(n in name for n in names):
                p.add_(torch.randn(p.shape, generator=gen) * scale)


@pytest.fixture(scope="module")
def trained(empty_llava, tmp_path_factory):
    """The three kinds of training output, made from the empty LLaVA with weights that visibly moved."""
    from peft import LoraConfig, PeftModel, get_peft_model

    base, _, processor = empty_llava
    root = tmp_path_factory.mktemp("runs")
    full = LlavaForConditionalGeneration.from_pretrained(base)
    _perturb(full, ("language_model.layers.0.", "multi_modal_projector"), seed=1)
    full.save_pretrained(root / "full")
    processor.save_pretrained(root / "full")

    peft_model = get_peft_model(LlavaForConditionalGeneration.from_pretrained(base),
                                LoraConfig(r=4, lora_alpha=8, target_modules=LORA_TARGETS,
                                           modules_to_save=["multi_modal_projector"]))
    _perturb(peft_model, ("lora_", "modules_to_save"), seed=2, scale=0.02)
    peft_model.save_pretrained(root / "lora")
    processor.save_pretrained(root / "lora")

    merged = PeftModel.from_pretrained(LlavaForConditionalGeneration.from_pretrained(base), root / "lora")
    merged.merge_and_unload().save_pretrained(root / "merged")
    processor.save_pretrained(root / "merged")
    for unfinished in ("checkpoint-10", ".final.partial"):  # what a Trainer leaves while it runs
        (root / "lora" / unfinished).mkdir()
        shutil.copy(root / "lora" / "adapter_config.json", root / "lora" / unfinished)
    return {"base": base, "root": root, "full": root / "full", "lora": root / "lora", "merged": root / "merged"}


@pytest.fixture(scope="module")
def image_prompt(eval_pngs):
    images = [Image.open(p).convert("RGB") for p in eval_pngs[:2]]
    return [user_message("Which image has more circles?", 2)], images


def _logits(loaded, image_prompt):
    messages, images = image_prompt
    inputs = prepare_inputs(loaded.processor, [messages], [images], loaded.device, loaded.dtype)
    with torch.no_grad():
        return loaded.model(**inputs).logits


def test_kinds_are_recognised_and_the_lora_base_comes_from_the_adapter(trained):
    assert [checkpoint_kind(trained[k]) for k in ("base", "full", "lora", "merged")] == ["full", "full", "lora", "full"]
    assert json.loads((trained["lora"] / "adapter_config.json").read_text())["base_model_name_or_path"] == str(
        trained["base"])
    assert adapter_base(trained["lora"]) == trained["base"]
    loaded = load_trained(trained["lora"], device="cpu")
    assert loaded.kind == "lora" and loaded.base == trained["base"] and loaded.dtype == torch.float32


def test_full_folder_loads_exactly_as_from_pretrained(trained, image_prompt):
    loaded = load_trained(trained["full"], device="cpu")
    reference = LlavaForConditionalGeneration.from_pretrained(trained["full"]).eval()
    messages, images = image_prompt
    inputs = AutoProcessor.from_pretrained(trained["full"])(
        text=loaded.processor.apply_chat_template(messages, add_generation_prompt=True), images=images,
        return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(reference(**inputs).logits, _logits(loaded, image_prompt))


def test_lora_and_merged_agree_and_differ_from_the_base(trained, image_prompt):
    base, lora, merged = (load_trained(trained[k], device="cpu") for k in ("base", "lora", "merged"))
    lora_logits, merged_logits = _logits(lora, image_prompt), _logits(merged, image_prompt)
    assert (lora_logits - merged_logits).abs().max().item() < 1e-4
    # A load that dropped the adapter or the trained projector would sit at the base's logits.
    assert (lora_logits - _logits(base, image_prompt)).abs().max().item() > 1e-2
    base_proj = base.model.model.multi_modal_projector.linear_1.weight
    assert not torch.allclose(merged.model.model.multi_modal_projector.linear_1.weight, base_proj)
    messages, images = image_prompt
    question = messages[0]["content"][-1]["text"]
    answers = [Chat(m).ask(question, images, max_new_tokens=12) for m in (lora, merged)]
    assert answers[0] == answers[1]


def test_all_three_kinds_answer_through_the_same_api(trained, image_prompt):
    _, images = image_prompt
    for kind in ("full", "lora", "merged"):
        loaded = load_trained(trained[kind], device="cpu")
        chat = Chat(loaded)
        first = chat.ask("How many circles are there?", images[:1], max_new_tokens=8)
        second = chat.ask("And here?", images[1:], max_new_tokens=8)
        assert isinstance(first, str) and isinstance(second, str)
        assert len(chat.messages) == 4 and len(chat.images) == 2


def test_lora_merged_on_load_matches_the_merged_folder(trained, image_prompt):
    folded = load_trained(trained["lora"], device="cpu", merge_lora=True)
    assert folded.model.__class__ is LlavaForConditionalGeneration
    diff = _logits(folded, image_prompt) - _logits(load_trained(trained["merged"], device="cpu"), image_prompt)
    assert diff.abs().max().item() < 1e-4


def test_relative_base_path_is_read_next_to_the_adapter_and_never_guessed(trained, tmp_path, monkeypatch):
    adapter = trained["base"].parent / "lora_relative"
    shutil.copytree(trained["lora"], adapter, dirs_exist_ok=True)
    config = json.loads((adapter / "adapter_config.json").read_text())
    monkeypatch.chdir(tmp_path)
    config["base_model_name_or_path"] = trained["base"].name  # relative to the adapter's parent
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    assert adapter_base(adapter) == trained["base"].parent / trained["base"].name
    # A path that is gone is an error naming it, even though a folder of the same name sits next door.
    for gone in (f"some/training/cwd/{trained['base'].name}", f"/gone/{trained['base'].name}"):
        config["base_model_name_or_path"] = gone
        (adapter / "adapter_config.json").write_text(json.dumps(config))
        with pytest.raises(LoadError, match=f"base model '{gone}' not found"):
            adapter_base(adapter)


def test_find_models_lists_trained_outputs_only(trained, tiny_world):
    (trained["root"] / "logs").mkdir(exist_ok=True)
    (trained["root"] / "logs" / "config.json").write_text(json.dumps({"architectures": ["Other"]}))
    stale = trained["root"] / "full_old.stale"  # a run course_lib.training.runs set aside: not offered
    shutil.copytree(trained["full"], stale)
    try:
        found = find_models(trained["root"], trained["root"] / "absent")
    finally:
        shutil.rmtree(stale)
    assert found == sorted([trained["full"], trained["lora"], trained["merged"]])


@pytest.mark.parametrize("what,expected", [
    ("missing", "no such folder"),
    ("empty", "neither config.json nor adapter_config.json"),
    ("llm", "describes ['Qwen2ForCausalLM'], expected LlavaForConditionalGeneration"),
    ("orphan", "base model 'gone/stage1' not found"),
    ("no_base", "base_model_name_or_path is empty"),
])
def test_bad_folders_get_errors_naming_them(trained, tiny_world, tmp_path, what, expected):
    folder = {"missing": tmp_path / "missing", "empty": tmp_path, "llm": tiny_world.llm}.get(what, tmp_path / what)
    if what in ("orphan", "no_base"):
        shutil.copytree(trained["lora"], folder)
        config = json.loads((folder / "adapter_config.json").read_text())
        config["base_model_name_or_path"] = "gone/stage1" if what == "orphan" else None
        (folder / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(LoadError, match=expected.replace("[", r"\[").replace("(", r"\(")) as err:
        load_trained(folder, device="cpu")
    assert str(folder) in str(err.value)


def test_device_and_dtype_choice(monkeypatch):
    assert pick_device("cpu") == torch.device("cpu") and pick_dtype(torch.device("cpu")) == torch.float32
    assert pick_dtype(torch.device("mps")) == torch.float32
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert pick_device() == torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert pick_dtype(torch.device("cuda")) == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert pick_dtype(torch.device("cuda")) == torch.float16
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert pick_device() == torch.device("cpu")


def test_images_are_bounded_and_bad_ones_named(tiny_world, tmp_path):
    good = next((tiny_world.data / "eval" / "images").glob("*.png"))
    image = load_image(good)
    assert image.mode == "RGB" and image.size == (64, 64)
    assert load_image(good.read_bytes(), name="up.png").tobytes() == image.tobytes()
    for path, expected in write_bad_images(tmp_path, good).items():
        with pytest.raises(ImageError, match=expected) as err:
            load_image(path)
        assert str(err.value).startswith(str(path)) and "\n" not in str(err.value)
    with pytest.raises(ImageError, match="over the limit of 1,000"):
        load_image(good, max_pixels=1000)


KINDS = ("full", "lora", "merged", "partial")


@pytest.fixture(scope="module")
def outputs(trained, tmp_path_factory):
    """The four kinds of output folder: full, LoRA, merged, and full + Partial LoRA files."""
    partial = tmp_path_factory.mktemp("partial") / "partial"
    shutil.copytree(trained["full"], partial)
    from safetensors.torch import save_file

    save_file({"a": torch.zeros(2)}, partial / "partial_lora.safetensors")
    (partial / "partial_lora.json").write_text("{}")
    return {**{kind: trained[kind] for kind in KINDS[:3]}, "partial": partial}


@pytest.mark.parametrize("old, new", [(a, b) for a in KINDS for b in KINDS if a != b])
def test_an_output_written_over_another_kind_replaces_it_whole(old, new, outputs, tmp_path):
    """Publishing a model into a folder that held another kind of output leaves only the new one: a stale
    adapter_config.json next to a new full model made every loader serve the old LoRA (and stale
    partial_lora files would apply an old Partial LoRA to it)."""
    from course_lib.model.partial_lora import has_partial_lora
    from course_lib.training.checkpoints import MODEL_FILES, publish_model

    out = tmp_path / "out"
    shutil.copytree(outputs[old], out, ignore=shutil.ignore_patterns("checkpoint-*", ".final.partial"))
    (out / "training_summary.json").write_text("{}")  # not a model file: kept
    staging = out / ".final.partial"
    shutil.copytree(outputs[new], staging, ignore=shutil.ignore_patterns("checkpoint-*", ".final.partial"))
    removed = publish_model(staging, out)
    kept = {"training_summary.json", "README.md"} & {p.name for p in out.iterdir()}  # not model files: kept
    expected = {p.name for p in outputs[new].iterdir() if p.is_file()} | kept
    assert {p.name for p in out.iterdir()} == expected and not staging.exists()
    assert checkpoint_kind(out) == checkpoint_kind(outputs[new])
    assert has_partial_lora(out) == (new == "partial")
    old_files = {p.name for p in outputs[old].iterdir() if p.is_file()}
    new_files = {p.name for p in outputs[new].iterdir() if p.is_file()}
    assert set(removed) == {f for f in old_files - new_files if f in MODEL_FILES}


def test_merge_into_a_lora_folder_replaces_it_and_keeps_the_image_preprocessing(trained, tmp_path):
    from course_lib.merge import main as merge_main
    from course_lib.serving.loading import read_preprocessing

    lora = tmp_path / "lora"
    shutil.copytree(trained["lora"], lora, ignore=shutil.ignore_patterns("checkpoint-*", ".final.partial"))
    (lora / "image_preprocessing.json").write_text(json.dumps({"pad_to_square": True, "image_tiling": 0}))
    out = tmp_path / "out"
    shutil.copytree(trained["lora"], out, ignore=shutil.ignore_patterns("checkpoint-*", ".final.partial"))
    assert merge_main(["--model", str(lora), "--out", str(out)]) == 0
    assert checkpoint_kind(out) == "full" and not (out / "adapter_config.json").exists()
    assert read_preprocessing(out) == {"pad_to_square": True, "image_tiling": 0}


def test_pickled_weights_are_refused_not_loaded(trained, tmp_path):
    """Safetensors only: a folder with pytorch_model.bin (or adapter_model.bin) alone is a LoadError."""
    full = tmp_path / "full"
    shutil.copytree(trained["full"], full)
    state = LlavaForConditionalGeneration.from_pretrained(full).state_dict()
    (full / "model.safetensors").unlink()
    torch.save(state, full / "pytorch_model.bin")
    with pytest.raises(LoadError, match="no model.safetensors .found pytorch_model.bin: pickled weights"):
        load_trained(full, device="cpu")
    lora = tmp_path / "lora"
    shutil.copytree(trained["lora"], lora, ignore=shutil.ignore_patterns("checkpoint-*", ".final.partial"))
    (lora / "adapter_model.safetensors").rename(lora / "adapter_model.bin")
    with pytest.raises(LoadError, match="no adapter_model.safetensors"):
        load_trained(lora, device="cpu")
