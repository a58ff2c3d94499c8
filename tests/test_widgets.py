"""The ipywidgets chat, driven headlessly: upload, Send, Clear, bad files, the model picker, streaming."""

import datetime
import html
import shutil

import ipywidgets as w
import pytest
from test_inference import write_bad_images

from course_lib.chat import Chat
from course_lib.data.images import load_image
from course_lib.serving.widgets import ChatUI, chat_ui


def upload_value(*files):
    """What ipywidgets 8's FileUpload holds after the browser sent files: a tuple of dicts."""
    now = datetime.datetime.now(datetime.timezone.utc)
    return tuple({"name": name, "type": "image/png", "size": len(data), "content": memoryview(data),
                  "last_modified": now} for name, data in files)


@pytest.fixture
def ui(loaded, tmp_path):
    return chat_ui(models={"empty": loaded}, runs_dir=tmp_path / "runs")


def _say(ui, text, files=()):
    if files:
        ui.upload.value = upload_value(*((p.name, p.read_bytes()) for p in files))
    ui.message.value = text
    ui.send.click()


def _items(ui):
    return [(e.role, e.kind, e.text) for e in ui.entries]


def test_upload_then_send_streams_an_answer_after_the_images(ui, loaded, eval_pngs):
    ui.upload.value = upload_value(*((p.name, p.read_bytes()) for p in eval_pngs[:2]))
    assert len(ui.pending) == 2 and len(ui.thumbnails.children) == 2 and ui.upload.value == ()
    ui.max_new_tokens.value = 12
    ui.message.value = "Which image has more circles?"
    ui.send.click()
    reference = Chat(loaded)
    expected = reference.ask("Which image has more circles?", [load_image(p) for p in eval_pngs[:2]], max_new_tokens=12)
    assert _items(ui) == [("user", "image", ""), ("user", "image", ""),
                          ("user", "text", "Which image has more circles?"), ("assistant", "text", expected)]
    kinds = [type(child) for child in ui.transcript.children]
    shown = html.escape(expected).replace("\n", "<br>")  # the reply may span lines
    assert kinds == [w.Image, w.Image, w.HTML, w.HTML] and shown in ui.transcript.children[-1].value
    assert ui.pending == [] and ui.thumbnails.children == () and ui.message.value == ""

    _say(ui, "And this one?", eval_pngs[2:])  # the second turn continues the same conversation
    second = reference.ask("And this one?", [load_image(eval_pngs[2])], max_new_tokens=12)
    assert _items(ui)[4:] == [("user", "image", ""), ("user", "text", "And this one?"), ("assistant", "text", second)]
    assert "<b>LLaVA:</b>" in ui.transcript.children[-1].value and not ui.send.disabled


def test_the_answer_is_updated_while_it_streams(ui, loaded):
    values = []

    def watch(change):
        if change["new"] and isinstance(change["new"][-1], w.HTML):
            change["new"][-1].observe(lambda c: values.append(c["new"]), names="value")

    ui.transcript.observe(watch, names="children")
    ui.max_new_tokens.value = 20
    _say(ui, "Describe the image.")
    final = Chat(loaded).ask("Describe the image.", max_new_tokens=20)
    # The transcript holds the streamed answer exactly, rendered as HTML (newlines become <br>).
    assert len(values) > 2 and ui.entries[-1].role == "assistant" and ui.entries[-1].text == final
    assert values[-1] == ui._html(ui.entries[-1])
    assert all(len(a) <= len(b) for a, b in zip(values, values[1:], strict=False))


def test_bad_uploads_become_messages_in_the_chat(loaded, eval_pngs, tmp_path):
    ui = chat_ui(models={"empty": loaded}, runs_dir=tmp_path / "runs", max_upload_bytes=10_000,
                 max_images_per_message=10)
    bad = write_bad_images(tmp_path / "bad", eval_pngs[0])
    files = [(p.name, p.read_bytes()) for p in bad if p.exists()]
    files += [("big.png", b"\x89PNG" + bytes(20_000)), ("ok.png", eval_pngs[0].read_bytes())]
    ui.upload.value = upload_value(*files)
    notices = [e.text for e in ui.entries if e.role == "notice"]
    assert notices == ["notes.txt: not an image Pillow can read (expected PNG, JPEG, WebP, ...)",
                       "broken.png: corrupt or truncated image (OSError)",
                       "huge.png: too large: 10000x10000 = 100,000,000 pixels, over the limit of 89,478,485 "
                       "(a possible decompression bomb)",
                       "bomb.png: too large: refused by Pillow as a decompression bomb "
                       "(the limit is 89,478,485 pixels)",
                       "big.png: file too large (20,004 bytes, the limit is 10,000)"]
    assert len(ui.pending) == 1  # only ok.png
    _say(ui, "How many circles are there?")
    assert ui.entries[-1].role == "assistant" and ui.entries[-1].text


def test_clear_forgets_the_conversation(ui, loaded, eval_pngs):
    ui.max_new_tokens.value = 8
    _say(ui, "How many circles are there?", eval_pngs[:1])
    ui.upload.value = upload_value((eval_pngs[1].name, eval_pngs[1].read_bytes()))
    ui.clear.click()
    assert ui.entries == [] and ui.transcript.children == () and ui.pending == [] and ui.thumbnails.children == ()
    _say(ui, "Hi")
    assert ui.entries[-1].text == Chat(loaded).ask("Hi", max_new_tokens=8)  # no history left


def test_picker_lists_runs_and_passed_models_and_survives_bad_ones(empty_llava, loaded, tmp_path):
    runs = tmp_path / "runs"
    shutil.copytree(empty_llava[0], runs / "stage1")
    (runs / "notes").mkdir()
    shutil.copytree(empty_llava[0], runs / "stage1_again")
    ui = chat_ui(models={"empty": loaded, "broken": tmp_path / "nowhere", "again": runs / "stage1_again"},
                 runs_dir=runs)
    assert list(ui.picker.options) == ["empty", "broken", "again", str(runs / "stage1")]  # no folder twice
    assert "loads on first message" not in ui.status.value  # a loaded model shows nothing to wait for

    ui.picker.value = "broken"
    _say(ui, "Hi")
    assert ui.entries[-1].role == "notice" and ui.entries[-1].text.startswith("cannot load broken:")

    ui.picker.value = str(runs / "stage1")
    assert ui.entries == []  # a new model starts a new conversation
    ui.max_new_tokens.value = 8
    _say(ui, "Hi")
    assert ui.entries[-1].text == Chat(loaded).ask("Hi", max_new_tokens=8)
    assert "full, cpu, float32" in ui.status.value


def test_no_model_and_empty_message_give_notices(tmp_path):
    ui = ChatUI(runs_dir=tmp_path)
    assert ui.picker.options == () and "no model" in ui.status.value
    _say(ui, "")
    _say(ui, "Hi")
    assert [e.text.split(" ")[0] for e in ui.entries] == ["write", "no"]


def test_a_failing_generation_is_reported_not_raised(loaded, tmp_path, monkeypatch):
    ui = chat_ui(models={"empty": loaded}, runs_dir=tmp_path)
    monkeypatch.setattr(loaded.model, "generate", lambda **kwargs: 1 / 0)
    _say(ui, "Hi")
    assert ui.entries[-1].text == "generation failed: ZeroDivisionError: division by zero"
    assert not ui.send.disabled


def test_image_counts_are_bounded_per_message_and_per_conversation(loaded, eval_pngs, tmp_path):
    ui = chat_ui(models={"empty": loaded}, runs_dir=tmp_path / "runs", max_images_per_message=2,
                 max_images_per_chat=3)
    png = (eval_pngs[0].name, eval_pngs[0].read_bytes())
    ui.upload.value = upload_value(*[png] * 500)  # one notice for the lot, two images kept
    assert len(ui.pending) == 2 and [e.text for e in ui.entries if e.role == "notice"] == [
        "498 of 500 images not added: at most 2 per message and 3 per conversation (Clear starts a new one)"]
    ui.max_new_tokens.value = 4
    _say(ui, "How many circles are there?")
    ui.upload.value = upload_value(png, png)  # the conversation holds 2: one more fits
    assert len(ui.pending) == 1 and ui.entries[-1].text.startswith("1 of 2 images not added")


def test_the_chinese_app_speaks_chinese_and_the_model_its_own_words(loaded, eval_pngs, tmp_path):
    ui = chat_ui(models={"empty": loaded}, runs_dir=tmp_path, lang="zh", max_upload_bytes=10_000)
    assert (ui.send.description, ui.clear.description, ui.picker.description, ui.upload.description) == (
        "发送", "清空", "模型", "图片")
    _say(ui, "")
    ui.upload.value = upload_value(("big.png", b"\0" * 20_004), ("notes.txt", b"hello"))
    assert [e.text for e in ui.entries] == [
        "请先写一条消息（图片会随消息一起发送）", "big.png：文件太大（20,004 字节，上限是 10,000）",
        "notes.txt: not an image Pillow can read (expected PNG, JPEG, WebP, ...)"]  # the library's words stay
    ui.max_new_tokens.value = 6
    _say(ui, "Hi")
    assert ui.entries[-1].text == Chat(loaded).ask("Hi", max_new_tokens=6)
    assert "<b>你:</b>" in ui.transcript.children[-2].value
    with pytest.raises(ValueError, match="lang='fr'"):
        ChatUI(runs_dir=tmp_path, lang="fr")
