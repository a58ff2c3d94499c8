"""Offline tests for `python -m course_lib.prepare` on tiny fixtures in each dataset's real hub layout.

Nothing here touches the network: every dataset is read with `--from_dir` pointing at a fixture.
The archive limits, path rules and validation live in tests/test_prepare_safety.py.
"""

from __future__ import annotations

import io
import json
import os
import stat
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from PIL import Image

from course_lib.data.records import check_sample, to_sample
from course_lib.prepare.__main__ import main
from course_lib.prepare.sharegpt4o import ZIP_PREFIX

# --------------------------------------------------------------------------- fixture helpers (shared)


def image_bytes(color=(200, 30, 30), fmt="JPEG") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 6), color).save(buf, format=fmt)
    return buf.getvalue()


def save_image(path: Path, color=(30, 200, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(image_bytes(color))
    return path


def write_zip(path: Path, members: dict, symlinks: dict | None = None, compression=zipfile.ZIP_STORED) -> Path:
    """`members`: entry name -> bytes; `symlinks`: entry name -> link target (stored as a symlink)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w", compression=compression) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
        for name, target in (symlinks or {}).items():
            info = zipfile.ZipInfo(name)
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            zf.writestr(info, target)
    return path


def write_json(path: Path, data) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def write_jsonl(path: Path, rows) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def llava(rec_id, image, question, answer="an answer", **extra):
    record = {"id": rec_id, "conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]}
    if image is not None:
        record["image"] = image
    record.update(extra)
    return record


def load_checked(json_path: Path, image_dir: Path) -> list:
    """Load a course-format file; every record must pass training's checks and name real, confined images."""
    records = json.loads(json_path.read_text(encoding="utf-8"))
    assert isinstance(records, list)
    for index, rec in enumerate(records):
        check_sample(to_sample(rec, index))  # what training runs on every record
        assert isinstance(rec["id"], str) and rec["id"]
        images = rec.get("image", [])
        for rel in [images] if isinstance(images, str) else images:
            assert not os.path.isabs(rel) and ".." not in Path(rel).parts
            with Image.open(image_dir / rel) as img:  # exists and is a real image
                img.verify()
        assert {t["from"] for t in rec["conversations"]} <= {"human", "gpt", "system"}
    return records


def run(dataset: str, *args) -> int:
    return main([dataset, *map(str, args)])


# --------------------------------------------------------------------------- LLaVA-CC3M-Pretrain-595K


@pytest.fixture
def cc3m_dir(tmp_path):
    src = tmp_path / "LLaVA-CC3M-Pretrain-595K"
    write_json(src / "chat.json", [
        llava("GCC_train_000000001", "GCC_train_000000001.jpg", "Describe this image.\n<image>"),
        llava("GCC_train_000000002", "GCC_train_000000002.jpg", "<image>\nWhat is shown?"),
        llava("GCC_train_000000003", "GCC_train_000000003.jpg", "Provide a caption.\n<image>"),  # not in the zip
        llava("GCC_train_000000004", "../escape.jpg", "Describe.\n<image>"),  # leaves the image folder
        llava("GCC_train_000000005", "GCC_train_000000005.jpg", "<image> <image> twice"),  # 2 placeholders
    ])
    write_json(src / "metadata.json", [])
    write_zip(src / "images.zip", {
        "GCC_train_000000001.jpg": image_bytes((255, 0, 0)),
        "GCC_train_000000002.jpg": image_bytes((0, 255, 0)),
        "GCC_train_000000005.jpg": image_bytes((0, 0, 255)),
        "../escape.jpg": b"zip-slip",
        "/abs/escape.jpg": b"absolute",
    }, symlinks={"GCC_link.jpg": "/etc/passwd"})
    return src


def test_cc3m_validates_and_extracts(cc3m_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert run("cc3m", "--from_dir", cc3m_dir, "--output_dir", out) == 0
    records = load_checked(out / "chat.json", out / "images_dl")
    assert [r["id"] for r in records] == ["GCC_train_000000001", "GCC_train_000000002"]
    assert records[0]["image"] == "GCC_train_000000001.jpg"
    assert records[1]["conversations"][0]["value"] == "<image>\nWhat is shown?"
    assert sorted(p.name for p in (out / "images_dl").iterdir()) == ["GCC_train_000000001.jpg",
                                                                     "GCC_train_000000002.jpg"]
    stdout = capsys.readouterr().out
    assert "skipped 3 records (image_count_mismatch=1, missing_image=1, unsafe_image_path=1)" in stdout
    assert "image_count_mismatch, first: record 'GCC_train_000000005': 2 <image> placeholders" in stdout
    assert "missing_image, first: record 'GCC_train_000000003'" in stdout
    assert "refused 3 unsafe archive entries" in stdout
    assert "wrote 2 records" in stdout
    assert not (tmp_path / "escape.jpg").exists() and not (out / "escape.jpg").exists()
    assert not list(out.rglob(".*.tmp"))  # the atomic writes left no temp file behind


def test_cc3m_max_samples_extracts_only_what_is_kept(cc3m_dir, tmp_path):
    out = tmp_path / "out"
    assert run("cc3m", "--from_dir", cc3m_dir, "--output_dir", out, "--max_samples", 1) == 0
    assert [r["id"] for r in load_checked(out / "chat.json", out / "images_dl")] == ["GCC_train_000000001"]
    assert [p.name for p in (out / "images_dl").iterdir()] == ["GCC_train_000000001.jpg"]


def test_cc3m_reads_an_already_extracted_images_dl(tmp_path):
    src = tmp_path / "src"
    write_json(src / "chat.json", [llava("GCC_train_1", "GCC_train_1.jpg", "Describe.\n<image>")])
    save_image(src / "images_dl" / "GCC_train_1.jpg")
    out = tmp_path / "out"
    assert run("cc3m", "--from_dir", src, "--output_dir", out) == 0
    assert [r["id"] for r in load_checked(out / "chat.json", out / "images_dl")] == ["GCC_train_1"]
    # converting in place (output == input) must not destroy the images
    assert run("cc3m", "--from_dir", src, "--output_dir", src) == 0
    assert len(load_checked(src / "chat.json", src / "images_dl")) == 1


# --------------------------------------------------------------------------- LLaVA-Instruct-150K


@pytest.fixture
def coco_dir(tmp_path):
    coco = tmp_path / "coco" / "train2017"
    for name in ("000000033471.jpg", "000000052846.jpg"):
        save_image(coco / name)
    return coco


def test_llava_instruct_150k_skips_and_counts_missing_images(coco_dir, tmp_path, capsys):
    src = tmp_path / "LLaVA-Instruct-150K"
    write_json(src / "llava_instruct_150k.json", [
        llava("000000033471", "000000033471.jpg", "<image>\nWhat are the colors of the bus?"),
        llava("000000052846", "000000052846.jpg", "Where is the cat?\n<image>"),
        llava("000000099999", "000000099999.jpg", "<image>\nMissing from train2017?"),
        llava("000000033471", "000000033471.jpg", "<image>\nA second conversation, same image."),
    ])
    out = tmp_path / "out"
    assert run("llava_instruct", "--from_dir", src, "--output_dir", out, "--coco_dir", coco_dir) == 0
    records = load_checked(out / "llava_instruct_150k.json", out / "images")
    assert [r["id"] for r in records] == ["000000033471", "000000052846", "000000033471"]
    assert (out / "images" / "000000033471.jpg").is_symlink()  # default: no 18 GB copy of COCO
    assert "skipped 1 records (missing_image=1)" in capsys.readouterr().out


def test_llava_mix665k_paths_text_only_and_ids(coco_dir, tmp_path, capsys):
    src = tmp_path / "LLaVA-Instruct-150K"
    write_json(src / "llava_v1_5_mix665k.json", [
        llava("000000033471", "coco/train2017/000000033471.jpg", "<image>\nWhat is this?"),
        llava("2354786", "gqa/images/2354786.jpg", "<image>\nIs the sky blue?"),
        llava(42, None, "A text-only ShareGPT question"),
        llava("000000052846", "coco/train2017/000000052846.jpg", "<image>\nTwo <image> tokens"),
        llava("bad", "coco/train2017/000000052846.jpg", "Q", "an <image> in the answer"),
    ])
    out = tmp_path / "out"
    args = ["--from_dir", src, "--output_dir", out, "--coco_dir", coco_dir, "--annotation", "llava_v1_5_mix665k.json"]
    assert run("llava_instruct", *args, "--link_mode", "copy") == 0
    records = load_checked(out / "llava_v1_5_mix665k.json", out / "images")
    assert [r["id"] for r in records] == ["000000033471", "42"]
    assert records[0]["image"] == "coco/train2017/000000033471.jpg"
    assert "image" not in records[1]
    assert not (out / "images" / "coco" / "train2017" / "000000033471.jpg").is_symlink()
    stdout = capsys.readouterr().out
    assert "skipped 3 records (image_count_mismatch=1, image_in_answer=1, missing_image=1)" in stdout

    root = tmp_path / "image_root"
    save_image(root / "gqa" / "images" / "2354786.jpg")
    assert run("llava_instruct", *args, "--image_root", root) == 0
    records = load_checked(out / "llava_v1_5_mix665k.json", out / "images")
    assert [r["id"] for r in records] == ["000000033471", "2354786", "42"]
    assert "skipped 2 records (image_count_mismatch=1, image_in_answer=1)" in capsys.readouterr().out


# --------------------------------------------------------------------------- ShareGPT-4o


def sharegpt4o_row(image, question):
    row = llava(None, image, question, "A long GPT-4o description.", width=8, height=6)
    del row["id"]  # the real rows carry no id
    return row


def test_sharegpt4o_jsonl_and_prefixed_zip(tmp_path, capsys):
    src = tmp_path / "ShareGPT-4o"
    write_jsonl(src / "image_conversations" / "gpt-4o.jsonl", [
        sharegpt4o_row("0a1b2c.jpg", "<image>\nPlease describe the image in detail."),
        sharegpt4o_row("3d4e5f.jpg", "Describe the image."),  # placeholder gets added
        sharegpt4o_row("missing.jpg", "<image>\nDescribe."),
        sharegpt4o_row("/abs/path.jpg", "<image>\nDescribe."),
    ])
    write_zip(src / "images.zip", {
        ZIP_PREFIX + "0a1b2c.jpg": image_bytes(),
        ZIP_PREFIX + "3d4e5f.jpg": image_bytes(fmt="PNG"),
        ZIP_PREFIX + "../../../../../../evil.jpg": b"zip-slip",
    })
    out = tmp_path / "out"
    assert run("sharegpt4o", "--from_dir", src, "--output_dir", out) == 0
    records = load_checked(out / "sharegpt4o.json", out / "images")
    assert [r["id"] for r in records] == ["sharegpt4o_000000", "sharegpt4o_000001"]
    assert [r["image"] for r in records] == ["0a1b2c.jpg", "3d4e5f.jpg"]
    assert records[1]["conversations"][0]["value"] == "<image>\nDescribe the image."
    stdout = capsys.readouterr().out
    assert "skipped 2 records (missing_image=1, unsafe_image_path=1)" in stdout
    assert "refused 1 unsafe archive entries" in stdout
    assert not list(tmp_path.rglob("evil.jpg"))


# --------------------------------------------------------------------------- TextOCR-GPT4o


@pytest.fixture
def textocr_src(tmp_path):
    src = tmp_path / "TextOCR-GPT4o"
    caption = 'DESCRIPTION\nA shop front.\n\nTEXT\nThe sign above the door says "BAKERY".'
    write_jsonl(src / "train.jsonl", [
        {"filename": "a4ea732cd3d5948a.jpg", "caption": caption},
        {"filename": "0000599864fd15b3.jpg", "caption": caption.replace("BAKERY", "OPEN")},
        {"filename": "ffffffffffffffff.jpg", "caption": caption},  # image not available
        {"filename": "1111111111111111.jpg", "caption": "   "},  # empty caption
    ])
    return src


def test_textocr_from_images_zip(textocr_src, tmp_path, capsys):
    images_zip = write_zip(tmp_path / "train_val_images.zip",
                           {f"train_images/{n}.jpg": image_bytes() for n in ("a4ea732cd3d5948a", "0000599864fd15b3")})
    out = tmp_path / "out"
    assert run("textocr", "--from_dir", textocr_src, "--output_dir", out, "--images_zip", images_zip) == 0
    records = load_checked(out / "textocr_gpt4o.json", out / "images")
    assert [r["id"] for r in records] == ["textocr_a4ea732cd3d5948a", "textocr_0000599864fd15b3"]
    assert records[0]["image"] == "a4ea732cd3d5948a.jpg"
    assert records[0]["conversations"][0]["value"].startswith("<image>\n")
    assert records[1]["conversations"][1]["value"].endswith('says "OPEN".')
    assert "skipped 2 records (bad_record=1, missing_image=1)" in capsys.readouterr().out


def test_textocr_from_images_dir_with_max_samples(textocr_src, tmp_path):
    images_dir = tmp_path / "train_images"
    save_image(images_dir / "a4ea732cd3d5948a.jpg")
    out = tmp_path / "out"
    args = ["--from_dir", textocr_src, "--output_dir", out, "--images_dir", images_dir, "--max_samples", 5]
    assert run("textocr", *args) == 0
    assert [r["id"] for r in load_checked(out / "textocr_gpt4o.json", out / "images")] == ["textocr_a4ea732cd3d5948a"]


# --------------------------------------------------------------------------- errors for people


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize(("dataset", "extra", "expected_file"), [
    ("cc3m", [], "chat.json"),
    ("llava_instruct", ["--coco_dir", "{tmp}"], "llava_instruct_150k.json"),
    ("sharegpt4o", [], "gpt-4o.jsonl"),
    ("textocr", ["--images_dir", "{tmp}"], "train.jsonl"),
])
def test_missing_input_file_is_one_line_and_exit_code_2(tmp_path, capsys, dataset, extra, expected_file):
    empty = tmp_path / "empty"
    empty.mkdir()
    extra = [arg.format(tmp=tmp_path) for arg in extra]
    assert run(dataset, "--from_dir", empty, "--output_dir", tmp_path / "out", *extra) == 2
    line = one_error_line(capsys)
    assert line.startswith("error: missing input file") and expected_file in line and "expected" in line
    assert not (tmp_path / "out").exists()


def test_the_command_line_exits_2_with_one_line(tmp_path):
    """The real `python -m course_lib.prepare`: exit code and stderr as a user sees them."""
    src = write_json(tmp_path / "src" / "chat.json", []).parent
    proc = subprocess.run([sys.executable, "-m", "course_lib.prepare", "cc3m", "--from_dir", str(src),
                           "--output_dir", str(tmp_path / "out")],
                          check=False, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: missing input file")
    assert "images.zip" in proc.stderr and "Traceback" not in proc.stderr


def test_old_hyphen_flag_and_unknown_dataset_are_usage_errors(tmp_path, capsys):
    for argv in (["cc3m", "--from-dir", str(tmp_path), "--output_dir", str(tmp_path)], ["coco", "--output_dir", "x"]):
        assert main(argv) == 2
        assert capsys.readouterr().err.startswith("error: ")


def test_textocr_needs_an_image_source(textocr_src, tmp_path, capsys):
    assert run("textocr", "--from_dir", textocr_src, "--output_dir", tmp_path / "out") == 2
    line = one_error_line(capsys)
    assert "--images_dir" in line and "--images_zip" in line


def test_invalid_json_is_one_line(tmp_path, coco_dir, capsys):
    src = tmp_path / "src"
    src.mkdir()
    (src / "llava_instruct_150k.json").write_text('[{"id": "1",\n oops]', encoding="utf-8")
    assert run("llava_instruct", "--from_dir", src, "--output_dir", tmp_path / "out", "--coco_dir", coco_dir) == 2
    assert "llava_instruct_150k.json is not valid JSON (line 2" in one_error_line(capsys)


def test_nothing_usable_writes_nothing(tmp_path, coco_dir):
    src = write_json(tmp_path / "src" / "llava_instruct_150k.json", [llava("1", "nope.jpg", "<image>")]).parent
    out = tmp_path / "out"
    assert run("llava_instruct", "--from_dir", src, "--output_dir", out, "--coco_dir", coco_dir) == 1
    assert not (out / "llava_instruct_150k.json").exists()
