"""Reading data: formats, images, the dataset's bad-sample policy and the validator."""

import json
import logging
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from course_lib.data.__main__ import main
from course_lib.data.dataset import DataError, LlavaDataset
from course_lib.data.image_tokens import image_token_count
from course_lib.data.images import expand2square, load_image, resolve_image_path, to_rgb
from course_lib.data.records import to_sample
from course_lib.world.broken import EXPECTED, write_broken_set, write_exotic_images

Q, A = "What color is the circle?", "red"


@pytest.fixture(scope="module")
def broken(tmp_path_factory):
    return write_broken_set(tmp_path_factory.mktemp("broken"))


def write(path, records, jsonl=False):
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "\n".join(json.dumps(r) for r in records) if jsonl else json.dumps(records)
    path.write_text(text)
    return path


def save(path, size=(64, 64), colour=(200, 30, 30)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


# --------------------------------------------------------------------------- formats


def test_four_formats_give_the_same_sample(tmp_path, processor):
    save(tmp_path / "images" / "a.png")
    system = "Answer briefly."
    llava = {"id": "s", "image": "a.png", "conversations": [
        {"from": "system", "value": system}, {"from": "human", "value": f"<image>\n{Q}"}, {"from": "gpt", "value": A}]}
    xtuner = {"id": "s", "image": "a.png", "conversation": [{"system": system, "input": f"<image>\n{Q}", "output": A}]}
    messages = {"id": "s", "images": ["a.png"], "messages": [
        {"role": "system", "content": system},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": f"\n{Q}"}]},
        {"role": "assistant", "content": A}]}
    files = [write(tmp_path / "llava.json", [llava]), write(tmp_path / "llava.jsonl", [llava], jsonl=True),
             write(tmp_path / "xtuner.json", [xtuner]), write(tmp_path / "messages.jsonl", [messages], jsonl=True)]
    items = [LlavaDataset(f, processor, template="chat")[0] for f in files]
    for item in items[1:]:
        assert torch.equal(item["input_ids"], items[0]["input_ids"]) and torch.equal(item["labels"], items[0]["labels"])
        assert torch.equal(item["pixel_values"], items[0]["pixel_values"])
    assert system in processor.tokenizer.decode(items[0]["input_ids"])  # the sample's system turn, not Qwen's


def test_cc3m_folder_layout_and_image_at_the_end(tiny_world, processor):
    ds = LlavaDataset(tiny_world.data / "pretrain", processor, template="chat")  # chat.json + images_dl/
    assert ds.image_folder.name == "images_dl" and len(ds) == 3000 and not ds.stats
    item = ds[0]
    ids = item["input_ids"].tolist()
    image_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    first, n = ids.index(image_id), image_token_count(processor)
    assert n == 4 and ids[first:first + n] == [image_id] * n and ids[first + n] != image_id  # one whole run
    text_before = processor.tokenizer.decode(ids[:first])
    assert text_before.endswith("Give a brief description of the image.\n")  # <image> stayed at the end of the turn
    assert item["pixel_values"].shape == (1, 3, 64, 64)


def test_items_lengths_and_text_only_samples(tiny_world, processor):
    ds = LlavaDataset(tiny_world.data / "instruct" / "instruct.json", processor, template="chat")
    assert ds.image_folder == tiny_world.data / "instruct" / "images"
    counts = {0: None, 1: None, 2: None}
    for k, n in enumerate(ds.image_counts):
        counts[n] = counts[n] if counts[n] is not None else k
    for n, k in counts.items():
        item = ds[k]
        assert set(item) == {"id", "input_ids", "labels", "pixel_values"}
        assert item["input_ids"].dtype == item["labels"].dtype == torch.long
        assert item["pixel_values"].shape == (n, 3, 64, 64) and item["pixel_values"].dtype == torch.float32
        assert (item["input_ids"] == ds.encoder.image_token_id).sum() == image_token_count(processor) * n
        assert len(item["input_ids"]) == ds.lengths[k]
        assert (ds.modality_lengths[k] < 0) == (n == 0)


def test_truncation_in_the_dataset_keeps_images_whole(tiny_world, processor):
    # Short enough that some conversations lose turns and some cannot keep even their first turn.
    ds = LlavaDataset(tiny_world.data / "instruct" / "instruct.json", processor, template="chat", model_max_length=28)
    assert ds.stats["truncated"] > 0 and ds.stats["dropped_too_long"] > 0
    n_records = len(json.loads((tiny_world.data / "instruct" / "instruct.json").read_text()))
    assert len(ds) == n_records - ds.stats["dropped_too_long"]
    for k in range(0, len(ds), 97):
        item = ds[k]
        n_image_tokens = (item["input_ids"] == ds.encoder.image_token_id).sum().item()
        assert len(item["input_ids"]) <= 28
        assert n_image_tokens == image_token_count(processor) * len(item["pixel_values"])
        assert (item["labels"][1:] != -100).any()


# --------------------------------------------------------------------------- images


def test_exotic_images_load_as_rgb(tmp_path):
    modes = write_exotic_images(tmp_path)
    assert {"RGBA", "P", "L", "LA", "1", "CMYK", "I;16"} <= set(modes.values())
    for name in modes:
        img = load_image(tmp_path / name)
        assert img.mode == "RGB" and img.size == Image.open(tmp_path / name).size


def test_sixteen_bit_is_scaled_and_transparency_is_white():
    mid_grey = Image.fromarray(np.full((4, 4), 32768, dtype=np.uint16))
    assert mid_grey.mode == "I;16" and to_rgb(mid_grey).getpixel((0, 0)) == (128, 128, 128)
    clear = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    assert to_rgb(clear).getpixel((0, 0)) == (255, 255, 255)
    palette = Image.new("P", (4, 4), 0)
    palette.info["transparency"] = 0
    assert to_rgb(palette).getpixel((0, 0)) == (255, 255, 255)


def test_paths_cannot_leave_the_image_folder(tmp_path):
    root = tmp_path / "images"
    save(root / "sub" / "a.png")
    save(tmp_path / "secret.png")
    os.symlink(tmp_path, root / "escape_dir")
    os.symlink(root / "sub" / "a.png", root / "linked.png")  # course_lib.prepare's --link_mode symlink
    assert resolve_image_path(root, "sub/a.png") == (root / "sub" / "a.png").resolve()
    assert resolve_image_path(root, str(root / "sub" / "a.png")) == (root / "sub" / "a.png").resolve()
    assert resolve_image_path(root, "linked.png").name == "linked.png"
    for bad in ("../secret.png", "sub/../../secret.png", str(tmp_path / "secret.png"), "/etc/passwd",
                "escape_dir/secret.png", "..", "sub/..", ""):
        with pytest.raises(DataError) as err:
            resolve_image_path(root, bad)
        assert err.value.reason == "unsafe_image_path"


def test_decompression_bomb_is_refused(broken, tmp_path):
    _, images = broken
    with pytest.raises(DataError, match="decompression bomb") as err:
        load_image(images / "bomb.png")  # 100 MP, refused from the header
    assert err.value.reason == "image_too_large"
    with pytest.raises(DataError, match="over the limit of 1,000") as err:
        load_image(save(tmp_path / "big.png", size=(50, 50)), max_pixels=1000)
    assert err.value.reason == "image_too_large"


def test_pad_to_square_uses_the_mean_colour(tmp_path, processor):
    wide = Image.new("RGB", (64, 16), (255, 0, 0))
    square = expand2square(wide, (1, 2, 3))
    assert square.size == (64, 64) and square.getpixel((0, 0)) == (1, 2, 3) and square.getpixel((0, 32)) == (255, 0, 0)
    save(tmp_path / "images" / "wide.png", size=(64, 16), colour=(255, 0, 0))
    data = write(tmp_path / "d.json", [{"id": "w", "image": "wide.png", "conversations": [
        {"from": "human", "value": f"<image>{Q}"}, {"from": "gpt", "value": A}]}])
    padded = LlavaDataset(data, processor, template="chat", pad_to_square=True)[0]["pixel_values"][0]
    cropped = LlavaDataset(data, processor, template="chat")[0]["pixel_values"][0]
    assert padded[:, :8].abs().max() < 0.05  # the mean colour normalises to about 0
    assert cropped[:, :8].abs().min() > 0.5  # CLIP's centre crop kept only red


# --------------------------------------------------------------------------- bad samples


def test_skip_policy_counts_every_problem_and_keeps_good_samples(broken, processor, caplog):
    data, images = broken
    with caplog.at_level(logging.WARNING, logger="course_lib.data.dataset"):
        ds = LlavaDataset(data, processor, template="chat", model_max_length=128)
        seen = [ds[k]["id"] for k in range(len(ds))] + [ds[k]["id"] for k in range(len(ds))]  # two epochs
    expected = {"missing_image": 1, "bad_image": 2, "image_too_large": 1, "unsafe_image_path": 1, "empty_turn": 1,
                "image_count_mismatch": 1, "bad_role_order": 1, "dropped_too_long": 1, "truncated": 1}
    assert dict(ds.stats) == expected
    good = {sid for sid, reason in EXPECTED.items() if reason in (None, "unknown_key", "truncated")}
    assert set(seen) == good  # no good sample lost, no bad one returned
    for sid in ("missing", "corrupt", "truncated", "bomb"):  # logged once, with the id, over two epochs
        assert sum(f"sample {sid!r}" in r.getMessage() for r in caplog.records) == 1


def test_skip_policy_returns_the_next_good_sample(broken, processor):
    ds = LlavaDataset(broken[0], processor, template="chat", model_max_length=128)
    ids = [s.id for s in ds.samples]
    assert ids[ids.index("missing"):ids.index("typo_key")] == ["missing", "corrupt", "truncated", "bomb"]
    for _ in range(2):  # deterministic: the first good sample after it, also the second time
        assert ds[ids.index("missing")]["id"] == "typo_key"
    assert ds.stats["missing_image"] == 1 and ds.stats["bad_image"] == 2 and ds.stats["image_too_large"] == 1


def test_error_policy_raises_one_line_naming_sample_and_file(broken, tmp_path, processor):
    with pytest.raises(DataError) as err:
        LlavaDataset(broken[0], processor, template="chat", on_bad_sample="error", model_max_length=128)
    message = str(err.value)
    assert "\n" not in message and "'escape'" in message and str(broken[0]) in message
    save(tmp_path / "images" / "ok.png")
    data = write(tmp_path / "d.json", [{"id": "gone", "image": "nope.png", "conversations": [
        {"from": "human", "value": f"<image>{Q}"}, {"from": "gpt", "value": A}]}])
    ds = LlavaDataset(data, processor, template="chat", on_bad_sample="error")
    with pytest.raises(DataError, match=r"sample 'gone' in .*d\.json: missing_image: .*nope\.png: no such file"):
        ds[0]


def test_bad_arguments_are_refused(tiny_world, processor, tmp_path):
    with pytest.raises(ValueError, match="on_bad_sample"):
        LlavaDataset(tiny_world.data / "pretrain", processor, on_bad_sample="ignore")
    with pytest.raises(DataError, match="has no chat.json"):
        LlavaDataset(tmp_path, processor)
    (tmp_path / "bad.json").write_text('[{"id": 1,\n oops]')
    with pytest.raises(DataError, match=r"bad.json is not valid JSON \(line 2"):
        LlavaDataset(tmp_path / "bad.json", processor)


def test_structural_problems_are_named(processor):
    cases = {
        "bad_record": {"id": "x", "conversations": "hello"},
        "bad_role_order": {"id": "x", "conversations": [{"from": "robot", "value": "hi"}]},
        "image_in_answer": {"id": "x", "conversations": [{"from": "human", "value": "hi"},
                                                          {"from": "gpt", "value": "<image>"}]},
    }
    for reason, record in cases.items():
        with pytest.raises(DataError) as err:
            to_sample(record, 0)
        assert err.value.reason == reason


# --------------------------------------------------------------------------- validator


def test_validator_reports_each_problem_by_id(broken, capsys):
    data, images = broken
    assert main(["validate", "--data", str(data), "--images", str(images), "--model_max_length", "128"]) == 1
    out = capsys.readouterr().out
    lines = [line.split() for line in out.splitlines() if line.startswith(("error", "warning"))]
    reported = {(words[1], words[2].rstrip(":")) for words in lines}
    assert reported == {(sid, reason) for sid, reason in EXPECTED.items() if reason}  # ok_* samples: no line
    assert "checked 21 samples: 9 with errors, 9 errors, 2 warnings" in out
    assert "  bad_image                   2  error" in out
    assert "text tokens per sample" in out and "|" in out.split("text tokens per sample")[1]


def test_validator_passes_a_clean_folder_and_finds_images_dl(tiny_world, tmp_path, capsys):
    records = json.loads((tiny_world.data / "pretrain" / "chat.json").read_text())[:20]
    write(tmp_path / "chat.json", records)
    os.symlink(tiny_world.data / "pretrain" / "images_dl", tmp_path / "images_dl")
    assert main(["validate", "--data", str(tmp_path), "--template", "plain"]) == 0
    assert "checked 20 samples: 0 with errors" in capsys.readouterr().out


@pytest.mark.parametrize("args", [["validate"], ["validate", "--data", "/no/such.json"],
                                  ["validate", "--data", ".", "--model_max_length", "x"], ["check"]])
def test_validator_bad_arguments_one_line_exit_2(args, capsys):
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ")


def test_validator_as_a_module(broken):
    proc = subprocess.run([sys.executable, "-m", "course_lib.data", "validate", "--data", str(broken[0]),
                           "--images", "/no/such/folder"], capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 2 and proc.stderr.strip() == "error: --images /no/such/folder: no such folder"


def test_a_named_pipe_is_refused_at_once_not_opened(tmp_path):
    """Opening a FIFO blocks until a writer comes: validation and training would hang forever on one."""
    fifo = tmp_path / "images" / "pipe.png"
    fifo.parent.mkdir()
    os.mkfifo(fifo)
    with pytest.raises(DataError, match="not a regular file") as err:
        load_image(fifo)
    assert err.value.reason == "not_a_file"


def test_exif_orientation_is_applied_in_training_and_chat_alike(tmp_path):
    """A phone's portrait photo: landscape pixels plus EXIF orientation 6 (rotate 90 degrees clockwise)."""
    from PIL import Image

    pixels = Image.new("RGB", (40, 20), (255, 0, 0))
    pixels.paste((0, 0, 255), (0, 0, 10, 20))  # blue strip on the left of the stored pixels
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "portrait.jpg"
    pixels.save(path, exif=exif.tobytes(), quality=95)
    upright = load_image(path)
    assert upright.size == (20, 40)
    r, g, b = upright.getpixel((10, 2))  # the stored left strip is now at the top
    assert b > 200 and r < 60
    assert load_image(path.read_bytes(), name="upload.jpg").tobytes() == upright.tobytes()


def test_validate_takes_a_processor_folder_this_project_saved(tmp_path, empty_llava):
    """transformers 5 writes processor_config.json (no preprocessor_config.json): the validator must take it."""
    folder, _, _ = empty_llava
    assert (folder / "processor_config.json").is_file()
    data = tmp_path / "d.json"
    data.write_text(json.dumps([{"id": "t", "conversations": [{"from": "human", "value": "Hi"},
                                                              {"from": "gpt", "value": "Hello."}]}]))
    assert main(["validate", "--data", str(data), "--processor", str(folder)]) == 0


def test_xtuner_llava_data_with_from_value_turns_under_conversation():
    """xtuner's LLaVA data layout (the InternVL/xtuner course notes) puts LLaVA turns under the singular key
    `conversation`; its internal layout puts input/output rounds there. Both read as the same messages."""
    from course_lib.data.records import to_sample

    turns = [{"from": "human", "value": "<image>\n第1个问题。"}, {"from": "gpt", "value": "第1个回答"},
             {"from": "human", "value": "第2个问题。"}, {"from": "gpt", "value": "第2个回答"}]
    llava_style = to_sample({"id": "a", "image": "x.jpg", "conversation": turns}, 0)
    rounds = to_sample({"id": "a", "image": "x.jpg", "conversation": [
        {"input": "<image>\n第1个问题。", "output": "第1个回答"}, {"input": "第2个问题。", "output": "第2个回答"}]}, 0)
    assert llava_style == rounds
    assert [m["role"] for m in llava_style.messages] == ["user", "assistant", "user", "assistant"]
