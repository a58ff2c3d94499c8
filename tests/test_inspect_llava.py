"""The helpers behind notebooks 00 and 01: tables read from disk, image path, language ability checks."""

from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import AutoModelForCausalLM, AutoTokenizer

from course_lib.build import vision_config_of
from course_lib.data.image_tokens import num_image_tokens
from course_lib.lessons.inspect_llava import (
    COURSE,
    chat_inputs,
    collapse_image_tokens,
    course_map,
    greedy_answer,
    image_path,
    list_files,
    max_logit_diff,
    projector_params,
    special_tokens,
    tiny_vs_real,
    world_summary,
)
from course_lib.util.tables import markdown_table

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


@pytest.fixture(scope="module")
def tiny_llm(tiny_world):
    return AutoModelForCausalLM.from_pretrained(tiny_world.llm, dtype=torch.float32).eval()


def test_markdown_table_escapes_tokens_and_formats_ints():
    table = markdown_table([{"token": "<|im_end|>", "id": 151645, "tied": True}])
    assert table.splitlines() == ["| token | id | tied |", "|---|---|---|",
                                  "| &lt;\\|im_end\\|&gt; | 151,645 | True |"]


def test_tiny_vs_real_reads_the_tiny_configs_and_counts_real_params(tiny_world, tiny_llm):
    rows = {r[""]: list(r.values())[1:] for r in tiny_vs_real(tiny_world)}
    tiny_tokens = num_image_tokens(vision_config_of(str(tiny_world.clip)))
    assert rows["image tokens per image"] == [tiny_tokens, 576, 576]
    assert rows["LM parameters"][0] == sum(p.numel() for p in tiny_llm.parameters())
    # The model cards: CLIP-L/336 vision 303.5M, Qwen2.5-0.5B 0.49B (tied), Qwen2.5-7B 7.61B.
    assert rows["vision tower parameters"][1:] == [303_507_456] * 2
    assert rows["LM parameters"][1:] == [494_032_768, 7_615_616_512]
    assert rows["tokenizer size"][0] == len(AutoTokenizer.from_pretrained(tiny_world.llm))
    assert all(n > 0 for n in rows["spare rows after adding <image>"])  # so build_llava never resizes


def test_projector_params_match_the_built_projector(empty_llava):
    _, model, _ = empty_llava
    vision, text = model.config.vision_config, model.config.text_config
    built = sum(p.numel() for p in model.model.multi_modal_projector.parameters())
    assert projector_params(vision.hidden_size, text.hidden_size) == built


def test_collapse_image_tokens():
    assert collapse_image_tokens("a<image><image>\nb<image>") == "a<image>×2\nb<image>×1"
    assert collapse_image_tokens("no image") == "no image"
    assert collapse_image_tokens("<im><im>", image_token="<im>") == "<im>×2"


def _image_inputs(tiny_world, processor):
    image = Image.open(next(iter(sorted((tiny_world.data / "eval" / "images").glob("*.png")))))
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "How many shapes?"}]}]
    text = processor.apply_chat_template(msgs, add_generation_prompt=True)
    return processor(images=image, text=text, return_tensors="pt")


def test_expanded_prompt_collapses_to_one_run(tiny_world, empty_llava):
    _, model, processor = empty_llava
    ids = _image_inputs(tiny_world, processor)["input_ids"][0]
    text = processor.tokenizer.decode(ids)
    assert collapse_image_tokens(text).count("<image>") == 1
    assert f"<image>×{model.config.image_seq_length}\n" in collapse_image_tokens(text)


def test_image_path_ends_with_what_llava_splices_in(tiny_world, empty_llava):
    _, model, processor = empty_llava
    pixels = _image_inputs(tiny_world, processor)["pixel_values"]
    steps = list(image_path(model, pixels).values())
    cfg = model.config
    n, dv, dt = cfg.image_seq_length, cfg.vision_config.hidden_size, cfg.text_config.hidden_size
    assert steps[2].shape == (1, n + 1, dv)  # CLS + patches
    assert steps[3].shape == (1, n, dv)
    assert steps[4].shape == (1, n, dt)
    with torch.no_grad():
        spliced = torch.cat(model.get_image_features(pixel_values=pixels).pooler_output)
    torch.testing.assert_close(steps[4][0], spliced)


def test_language_ability_is_kept(empty_llava, tiny_llm):
    _, model, processor = empty_llava
    question = "How many corners does a triangle have?"
    assert max_logit_diff(model, tiny_llm, chat_inputs(processor.tokenizer, question)) < 1e-5
    answer = greedy_answer(model, processor.tokenizer, question)
    assert answer and answer == greedy_answer(tiny_llm, processor.tokenizer, question)


def test_special_tokens_of_the_llava_tokenizer(empty_llava):
    _, model, processor = empty_llava
    rows = {r["token"]: r for r in special_tokens(processor.tokenizer)}
    assert list(rows) == ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>"]
    assert rows["<image>"]["id"] == model.config.image_token_index
    assert rows["<|im_end|>"]["role"] == "eos" and rows["<|endoftext|>"]["role"] == "pad"
    assert all(r["meaning"] for r in rows.values())


def test_world_summary_counts_records_and_images(tiny_world):
    for row in world_summary(tiny_world):
        assert row["text-only"] + row["1 image"] + row["2 images"] == row["records"] > 0
        assert row["image files"] == row["1 image"] + 2 * row["2 images"]


def test_list_files_of_a_saved_llava(empty_llava):
    folder, _, _ = empty_llava
    files = {r["file"]: r["KiB"] for r in list_files(folder)}
    assert {"model.safetensors", "config.json", "processor_config.json", "chat_template.jinja"} <= set(files)
    assert files["model.safetensors"] > 0


def test_course_map_covers_the_notebooks_and_the_readme():
    names = [name for name, _, _ in COURSE]
    assert names == sorted(names) and [n[:2] for n in names] == [f"{i:02d}" for i in range(12)]
    assert {p.stem for p in NOTEBOOKS.glob("*.ipynb")} <= set(names)
    rows = course_map(NOTEBOOKS)
    assert all(r["status"] == ("here" if (NOTEBOOKS / f"{r['notebook']}.ipynb").exists() else "to come")
               for r in rows)
    assert not any("to come" in r["course_lib modules"] for r in rows)  # every module named exists
    # notebooks/README.md carries the same table (without the status column).
    assert markdown_table(course_map()) in (NOTEBOOKS / "README.md").read_text()
