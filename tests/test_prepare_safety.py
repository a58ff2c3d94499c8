"""What `course_lib.prepare` refuses: bad conversations (training's rules), unsafe paths, zip bombs, non-images.

Fixtures stay tiny: the per-member cap is lowered through the module constant, and the ratio bomb is
2 MiB of zeros that deflates to about 2 kB.
"""

from __future__ import annotations

import json
import zipfile

import pytest
from test_prepare import image_bytes, llava, load_checked, run, save_image, write_json, write_zip

from course_lib.prepare import archive
from course_lib.prepare.errors import InputError, SkipRecord
from course_lib.prepare.paths import safe_relpath
from course_lib.util.files import atomic_write_json

# --------------------------------------------------------------------------- conversations: training's rules


def test_a_conversation_training_rejects_is_skipped_and_named(tmp_path, capsys):
    src = tmp_path / "src"
    write_json(src / "chat.json", [
        llava("ok", "a.jpg", "<image>\nDescribe."),
        {"id": "dangling", "image": "a.jpg", "conversations": [  # ends on a question: training rejects it
            {"from": "human", "value": "<image>\nDescribe."}, {"from": "gpt", "value": "A cat."},
            {"from": "human", "value": "And?"}]},
        llava("empty", "a.jpg", "<image>\nDescribe.", answer="  "),
        llava("robot", "a.jpg", "<image>\nDescribe.") | {"conversations": [{"from": "robot", "value": "<image>"}]},
    ])
    save_image(src / "images_dl" / "a.jpg")
    out = tmp_path / "out"
    assert run("cc3m", "--from_dir", src, "--output_dir", out) == 0
    assert [r["id"] for r in load_checked(out / "chat.json", out / "images_dl")] == ["ok"]
    stdout = capsys.readouterr().out
    assert "skipped 3 records (bad_role_order=2, empty_turn=1)" in stdout
    assert "bad_role_order, first: record 'dangling': roles ['user', 'assistant', 'user']" in stdout


def test_every_record_prepare_writes_is_accepted_by_training(tmp_path):
    coco = tmp_path / "coco"
    for name in ("a.jpg", "b.jpg"):
        save_image(coco / name)
    src = tmp_path / "src"
    write_json(src / "llava_v1_5_mix665k.json", [
        llava("plain", "coco/train2017/a.jpg", "What is this?\n<image>"),
        llava("prepended", "a.jpg", "What is this?"),
        llava("text_only", None, "Hello?"),
        llava("two_images", ["a.jpg", "b.jpg"], "<image> and <image>: same?", "No."),
        {"id": "system_and_roles", "image": "b.jpg", "conversations": [
            {"from": "system", "value": "Be brief."}, {"from": "user", "value": "<image>\nColour?"},
            {"from": "assistant", "value": "Green."}, {"from": "human", "value": "Sure?"},
            {"from": "gpt", "value": "Yes."}]},
    ])
    out = tmp_path / "out"
    assert run("llava_instruct", "--from_dir", src, "--output_dir", out, "--coco_dir", coco,
               "--annotation", "llava_v1_5_mix665k.json") == 0
    records = load_checked(out / "llava_v1_5_mix665k.json", out / "images")  # to_sample + check_sample each
    assert [r["id"] for r in records] == ["plain", "prepended", "text_only", "two_images", "system_and_roles"]
    assert records[1]["conversations"][0]["value"] == "<image>\nWhat is this?"
    assert [t["from"] for t in records[4]["conversations"]] == ["system", "human", "gpt", "human", "gpt"]


# --------------------------------------------------------------------------- zip archives: bounded extraction


def cc3m_with_zip(tmp_path, members: dict, compression=zipfile.ZIP_STORED):
    src = tmp_path / "src"
    write_json(src / "chat.json", [llava(name.split(".")[0], name, "<image>\nDescribe.") for name in members])
    write_zip(src / "images.zip", members, compression=compression)
    return src


def test_zip_member_over_the_per_file_cap_is_skipped(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(archive, "MAX_MEMBER_BYTES", 2000)
    src = cc3m_with_zip(tmp_path, {"small.jpg": image_bytes(), "big.jpg": image_bytes() + b"\0" * 3000})
    out = tmp_path / "out"
    assert run("cc3m", "--from_dir", src, "--output_dir", out) == 0
    assert [r["id"] for r in load_checked(out / "chat.json", out / "images_dl")] == ["small"]
    assert "skipped 1 records (file_too_large=1)" in capsys.readouterr().out
    assert not (out / "images_dl" / "big.jpg").exists()


def test_zip_ratio_bomb_is_skipped(tmp_path, capsys):
    src = cc3m_with_zip(tmp_path, {"ok.jpg": image_bytes(), "bomb.jpg": b"\0" * (2 * 2**20)}, zipfile.ZIP_DEFLATED)
    assert (src / "images.zip").stat().st_size < 20_000  # the fixture itself stays tiny
    out = tmp_path / "out"
    assert run("cc3m", "--from_dir", src, "--output_dir", out) == 0
    assert [r["id"] for r in load_checked(out / "chat.json", out / "images_dl")] == ["ok"]
    assert "skipped 1 records (suspicious_ratio=1)" in capsys.readouterr().out
    assert not (out / "images_dl" / "bomb.jpg").exists()


def test_extraction_reads_at_most_cap_plus_one_bytes(tmp_path, monkeypatch):
    """The header passed the cap; the bytes actually read are still counted and bounded."""
    images = archive.ZipImages(write_zip(tmp_path / "a.zip", {"x.jpg": b"x" * 5000}))
    writer = images.get("x.jpg")  # the header check passes at the default cap
    reads = []
    real_open = images._zip.open

    def counting_open(*args, **kwargs):
        handle = real_open(*args, **kwargs)
        real_read = handle.read

        def read(n=-1):
            chunk = real_read(n)
            reads.append(len(chunk))
            return chunk

        handle.read = read
        return handle

    monkeypatch.setattr(images._zip, "open", counting_open)
    monkeypatch.setattr(archive, "MAX_MEMBER_BYTES", 1000)  # as if the header had lied about the size
    with pytest.raises(SkipRecord) as skip:
        writer(tmp_path / "x.jpg")
    assert skip.value.reason == "file_too_large"
    assert sum(reads) == 1001
    assert not list(tmp_path.glob("*x.jpg*"))  # neither the file nor its temporary file


def test_total_extraction_cap_stops_with_one_line(tmp_path, capsys):
    src = cc3m_with_zip(tmp_path, {"a.jpg": image_bytes(), "b.jpg": image_bytes((0, 0, 9))})
    cap = len(image_bytes()) + 100  # room for one image, not two
    out = tmp_path / "out"
    assert run("cc3m", "--from_dir", src, "--output_dir", out, "--max_extract_gb", cap / archive.GIB) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: extracting from") and "--max_extract_gb" in err[0]
    assert not (out / "chat.json").exists()


def test_non_image_members_are_skipped_and_counted(tmp_path, capsys):
    src = cc3m_with_zip(tmp_path, {"ok.jpg": image_bytes(), "notes.txt": b"not an image", "x.JPEG": image_bytes()})
    out = tmp_path / "out"
    assert run("cc3m", "--from_dir", src, "--output_dir", out) == 0
    assert [r["id"] for r in load_checked(out / "chat.json", out / "images_dl")] == ["ok", "x"]
    assert "skipped 1 records (not_an_image=1)" in capsys.readouterr().out
    assert not (out / "images_dl" / "notes.txt").exists()


def test_a_corrupt_member_is_skipped(tmp_path, capsys):
    src = cc3m_with_zip(tmp_path, {"ok.jpg": image_bytes(), "bad.jpg": b"JPEGDATA" * 20})
    data = (src / "images.zip").read_bytes()
    (src / "images.zip").write_bytes(data.replace(b"JPEGDATA" * 20, b"JPEGDATX" * 20))  # CRC no longer matches
    out = tmp_path / "out"
    assert run("cc3m", "--from_dir", src, "--output_dir", out) == 0
    assert "skipped 1 records (bad_zip_member=1)" in capsys.readouterr().out
    assert not list((out / "images_dl").glob("*bad.jpg*"))


def test_zip_images_refuses_slip_and_symlink_entries(tmp_path):
    zip_path = write_zip(tmp_path / "a.zip",
                         {"ok/x.jpg": b"x", "../up.jpg": b"u", "/root.jpg": b"r", "a\\..\\b.jpg": b"b", "dir/": b""},
                         symlinks={"link.jpg": "../../etc/passwd"})
    images = archive.ZipImages(zip_path)
    assert sorted(images.refused) == sorted(["../up.jpg", "/root.jpg", "a\\..\\b.jpg", "link.jpg"])
    assert images.get("../up.jpg") is None and images.get("link.jpg") is None
    images.get("ok/x.jpg")(tmp_path / "x.jpg")
    assert (tmp_path / "x.jpg").read_bytes() == b"x"


def test_an_unreadable_zip_is_one_error(tmp_path):
    (tmp_path / "a.zip").write_bytes(b"not a zip")
    with pytest.raises(InputError, match="cannot read zip archive"):
        archive.ZipImages(tmp_path / "a.zip")


# --------------------------------------------------------------------------- paths and files


@pytest.mark.parametrize(("value", "expected"), [
    ("a.jpg", "a.jpg"), ("./coco/train2017/a.jpg", "coco/train2017/a.jpg"), ("../a.jpg", None),
    ("coco/../../a.jpg", None), ("/etc/passwd", None), ("C:/x.jpg", None), ("a\\..\\b.jpg", None),
    ("", None), (None, None), (3, None),
])
def test_safe_relpath(value, expected):
    assert safe_relpath(value) == expected


def test_atomic_write_json_replaces_and_cleans_up(tmp_path):
    """The writer prepare uses for its output: all or nothing, never a half-written file."""
    target = tmp_path / "d.json"
    target.write_text("old", encoding="utf-8")
    atomic_write_json(target, [{"id": "é"}])
    assert json.loads(target.read_text(encoding="utf-8")) == [{"id": "é"}]
    with pytest.raises(TypeError):
        atomic_write_json(target, [object()])
    assert json.loads(target.read_text(encoding="utf-8")) == [{"id": "é"}]  # untouched on failure
    assert [p.name for p in tmp_path.iterdir()] == ["d.json"]
