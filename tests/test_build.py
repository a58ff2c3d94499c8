"""Building an empty LLaVA: language ability kept, image tokens expand right, round trip exact."""

import subprocess
import sys

import pytest
import torch
from PIL import Image
from transformers import (
    AutoModelForCausalLM,
    AutoProcessor,
    AutoTokenizer,
    CLIPConfig,
    CLIPImageProcessor,
    CLIPModel,
    LlavaForConditionalGeneration,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from course_lib.build import BuildError, build_llava
from course_lib.data.image_tokens import num_image_tokens


def _prompt_ids(tokenizer, text="What is 3 plus 4?"):
    msgs = [{"role": "user", "content": text}]
    prompt = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    return tokenizer(prompt, return_tensors="pt")


def test_text_only_logits_equal_the_source_llm(tiny_world, empty_llava):
    _, model, processor = empty_llava
    llm = AutoModelForCausalLM.from_pretrained(tiny_world.llm, dtype=torch.float32).eval()
    ids = _prompt_ids(processor.tokenizer)
    with torch.no_grad():
        diff = (model(**ids).logits - llm(**ids).logits).abs().max().item()
    assert diff < 1e-5


def test_only_the_projector_is_new(tiny_world, empty_llava):
    from transformers import CLIPVisionModel

    _, model, _ = empty_llava
    clip = CLIPVisionModel.from_pretrained(tiny_world.clip)
    for name, p in clip.state_dict().items():
        assert torch.equal(model.model.vision_tower.state_dict()[name], p), name
    assert model.config.vision_feature_layer == -2
    assert model.config.vision_feature_select_strategy == "default"


def test_round_trip_gives_identical_outputs_and_no_missing_keys(tiny_world, empty_llava):
    folder, model, _ = empty_llava
    loaded, info = LlavaForConditionalGeneration.from_pretrained(folder, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert (folder / "model.safetensors").is_file() and not list(folder.glob("*.bin"))
    processor = AutoProcessor.from_pretrained(folder)
    image = Image.open(next((tiny_world.data / "eval" / "images").glob("*.png")))
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "How many shapes?"}]}]
    inputs = processor(images=image, text=processor.apply_chat_template(msgs, add_generation_prompt=True),
                       return_tensors="pt")
    n_img = (inputs["input_ids"] == loaded.config.image_token_index).sum().item()
    assert n_img == num_image_tokens(loaded.config.vision_config) == 4  # (64 px / patch 32)^2
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, loaded.eval()(**inputs).logits)


def test_processor_template_matches_the_tokenizer_template_and_writes_no_default_system(empty_llava):
    path, _, processor = empty_llava
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    as_list = [{"role": m["role"], "content": [{"type": "text", "text": m["content"]}]} for m in msgs]
    chatml = "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello<|im_end|>\n"
    loaded = AutoTokenizer.from_pretrained(path)
    for tokenizer in (processor.tokenizer, loaded):
        assert processor.apply_chat_template(as_list) == tokenizer.apply_chat_template(msgs, tokenize=False) == chatml
    system = [{"role": "system", "content": "Be brief."}, *msgs]
    assert loaded.apply_chat_template(system, tokenize=False) == "<|im_start|>system\nBe brief.<|im_end|>\n" + chatml


@pytest.fixture(scope="module")
def clip_l336_shaped(tmp_path_factory, tiny_world):
    """CLIP-L/336 geometry (336 px, patch 14) at tiny width and depth, saved like the real one."""
    out = tmp_path_factory.mktemp("clip_l336")
    vision = dict(image_size=336, patch_size=14, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=2)
    text = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                bos_token_id=0, eos_token_id=1, pad_token_id=1)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=32)).save_pretrained(out)
    CLIPImageProcessor(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}).save_pretrained(out)
    return out


def test_clip_l336_geometry_expands_to_576_tokens(clip_l336_shaped, tiny_world):
    model, processor = build_llava(str(clip_l336_shaped), str(tiny_world.llm))
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe."}]}]
    inputs = processor(images=Image.new("RGB", (500, 400), "red"),
                       text=processor.apply_chat_template(msgs, add_generation_prompt=True), return_tensors="pt")
    assert (inputs["input_ids"] == model.config.image_token_index).sum().item() == 576
    assert model.config.image_seq_length == 576
    with torch.no_grad():
        out = model(**inputs)
    assert out.logits.shape[1] == inputs["input_ids"].shape[1]


def test_embeddings_resize_only_when_no_spare_row(tmp_path, tiny_world):
    tok = AutoTokenizer.from_pretrained(tiny_world.llm)
    cfg = Qwen2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=False)
    Qwen2ForCausalLM(cfg).save_pretrained(tmp_path / "llm")
    tok.save_pretrained(tmp_path / "llm")
    model, processor = build_llava(str(tiny_world.clip), str(tmp_path / "llm"))
    assert model.get_input_embeddings().num_embeddings == len(tok) + 1 == len(processor.tokenizer)
    spare, _ = build_llava(str(tiny_world.clip), str(tiny_world.llm))
    assert spare.get_input_embeddings().num_embeddings == AutoModelForCausalLM.from_pretrained(
        tiny_world.llm).get_input_embeddings().num_embeddings


@pytest.mark.parametrize("vision,llm,expected", [
    ("clip", "clip", "expected a Qwen2/Qwen2.5 causal LM (model_type 'qwen2'), got model_type 'clip'"),
    ("llm", "llm", "expected a CLIP checkpoint (model_type 'clip'), got model_type 'qwen2'"),
    ("/no/such/folder", "llm", "no such folder"),
])
def test_bad_inputs_get_one_line_errors(tiny_world, tmp_path, vision, llm, expected):
    paths = {"clip": str(tiny_world.clip), "llm": str(tiny_world.llm)}
    with pytest.raises(BuildError, match=expected.replace("(", r"\(").replace(")", r"\)")):
        build_llava(paths.get(vision, vision), paths.get(llm, llm))
    proc = subprocess.run([sys.executable, "-m", "course_lib.build", "--vision", paths.get(vision, vision),
                           "--llm", paths.get(llm, llm), "--out", str(tmp_path / "x")],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and expected in proc.stderr
    assert not (tmp_path / "x").exists()


def test_the_image_token_joins_the_checkpoint_special_tokens_instead_of_replacing_them(tiny_world):
    from transformers import AutoTokenizer

    own = AutoTokenizer.from_pretrained(tiny_world.llm).extra_special_tokens
    _, processor = build_llava(str(tiny_world.clip), str(tiny_world.llm))
    assert processor.tokenizer.extra_special_tokens == [*own, "<image>"]
    assert "<|im_start|>" in processor.tokenizer.all_special_tokens
