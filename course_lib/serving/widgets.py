"""An ipywidgets chat with image upload: pick a model, add images, ask, watch the answer stream in.

    ui = chat_ui()   # every trained output under the course's runs folder, plus any `models=` passed in
    ui               # displays in JupyterLab or Voila

Uploads are checked before use: at most `max_upload_bytes` per file, decodable by Pillow, and at most
`max_pixels` pixels (read from the header, so a decompression bomb is never decoded), and at most
`max_images_per_message` / `max_images_per_chat` images (extra files are refused with one notice). A bad file gets
a message in the chat; nothing raises into the notebook. Generation runs in the click handler and
updates the answer widget token by token; ipykernel sends each update as it happens.
"""

from __future__ import annotations

import html
import io
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import ipywidgets as w
from PIL import Image

from course_lib.chat import Chat
from course_lib.data.images import MAX_IMAGE_PIXELS, ImageError, load_image
from course_lib.serving.loading import LoadedModel, find_models, load_trained

MAX_UPLOAD_BYTES = 20 * 2**20  # 20 MiB: a large photo; the browser sends the whole file over the kernel's websocket
# Every image costs its tokens (576 for CLIP-L/336) in every later turn's prompt: a handful fills a 2048 context.
MAX_IMAGES_PER_MESSAGE, MAX_IMAGES_PER_CHAT = 4, 8
THUMBNAIL_PX = 96
ModelSource = str | Path | LoadedModel
# The app's own words, per language (`lang=`). The model's answers, and the library's messages about a bad image,
# stay as they are.
TEXT = {
    "en": {"model": "model", "images": "images", "placeholder": "Ask about the images, or anything", "send": "Send",
           "clear": "Clear", "temperature": "temperature", "greedy": "0 = greedy", "max_new_tokens": "max new tokens",
           "you": "You",
           "too_many": "{refused} of {sent} images not added: at most {per_message} per message and {per_chat} per "
                       "conversation (Clear starts a new one)",
           "too_large": "{name}: file too large ({size:,} bytes, the limit is {limit:,})",
           "no_model_status": "no model: train one into runs/ or pass models=...",
           "no_model": "no model to talk to: train one into runs/ or pass models=... to chat_ui",
           "loads_later": "loads on first message", "loading": "loading…", "load_failed": "load failed",
           "cannot_load": "cannot load {label}: {err}", "empty_message": "write a message first (images are sent "
                                                                         "along with it)",
           "generation_failed": "generation failed: {err}"},
    "zh": {"model": "模型", "images": "图片", "placeholder": "问问图片里的内容，或者随便聊聊", "send": "发送",
           "clear": "清空", "temperature": "温度", "greedy": "0 = 贪心解码", "max_new_tokens": "最多新 token 数",
           "you": "你",
           "too_many": "{sent} 张图片中有 {refused} 张没有加入：每条消息最多 {per_message} 张，"
                       "每段对话最多 {per_chat} 张（点“清空”开始新对话）",
           "too_large": "{name}：文件太大（{size:,} 字节，上限是 {limit:,}）",
           "no_model_status": "没有模型：先训练一个到 runs/ 下，或传入 models=...",
           "no_model": "没有可以对话的模型：先训练一个到 runs/ 下，或给 chat_ui 传入 models=...",
           "loads_later": "发送第一条消息时加载", "loading": "加载中…", "load_failed": "加载失败",
           "cannot_load": "无法加载 {label}：{err}", "empty_message": "请先写一条消息（图片会随消息一起发送）",
           "generation_failed": "生成失败：{err}"},
}


@dataclass
class Entry:
    """One item of the transcript: who said it, and either text or an image."""

    role: str  # "user", "assistant" or "notice"
    kind: str  # "text" or "image"
    text: str = ""
    png: bytes = b""  # thumbnails, for kind == "image"


def _png(image: Image.Image, size: int = THUMBNAIL_PX) -> bytes:
    thumb = image.copy()
    thumb.thumbnail((size, size))
    buffer = io.BytesIO()
    thumb.save(buffer, format="PNG")
    return buffer.getvalue()


def _label(source: ModelSource) -> str:
    return source.name if isinstance(source, LoadedModel) else str(source)


def model_options(models: Mapping[str, ModelSource] | Sequence[ModelSource] | None,
                  runs_dirs: Sequence[str | Path]) -> dict[str, ModelSource]:
    """Picker entries, label -> model: the ones passed in first, then the other outputs found under `runs_dirs`."""
    options = dict(models) if isinstance(models, Mapping) else {_label(m): m for m in models or ()}
    known = {Path(m.path if isinstance(m, LoadedModel) else m).resolve() for m in options.values()}
    for root in runs_dirs:
        for folder in find_models(root):
            if folder.resolve() not in known:
                options.setdefault(str(folder), folder)
    return options


class ChatUI:
    """The widgets and their handlers. Display `ui` (or `ui.widget`); tests drive the handlers directly."""

    def __init__(self, models: Mapping[str, ModelSource] | Sequence[ModelSource] | None = None,
                 runs_dir: str | Path | Sequence[str | Path] | None = None, *,
                 loader: Callable[[str | Path], LoadedModel] = load_trained,
                 max_upload_bytes: int = MAX_UPLOAD_BYTES, max_pixels: int = MAX_IMAGE_PIXELS,
                 max_images_per_message: int = MAX_IMAGES_PER_MESSAGE, max_images_per_chat: int = MAX_IMAGES_PER_CHAT,
                 lang: str = "en"):
        if lang not in TEXT:
            raise ValueError(f"lang={lang!r}: expected one of {', '.join(TEXT)}")
        self.text = TEXT[lang]
        if runs_dir is None:
            from course_lib.training.launch import runs_dir as course_runs  # where the training notebooks write

            runs_dir = course_runs()
        runs_dirs = [runs_dir] if isinstance(runs_dir, str | Path) else list(runs_dir)
        self.sources = model_options(models, runs_dirs)
        self.loader, self.max_upload_bytes, self.max_pixels = loader, max_upload_bytes, max_pixels
        self.max_images_per_message, self.max_images_per_chat = max_images_per_message, max_images_per_chat
        self.entries: list[Entry] = []
        self.pending: list[Image.Image] = []
        self._chats = {label: Chat(src) for label, src in self.sources.items() if isinstance(src, LoadedModel)}

        self.picker = w.Dropdown(options=list(self.sources), description=self.text["model"],
                                 layout=w.Layout(width="60%"))
        self.status = w.HTML()
        self.transcript = w.VBox(layout=w.Layout(border="1px solid #ccc", padding="6px", min_height="120px",
                                                 max_height="480px", overflow="auto"))
        self.thumbnails = w.HBox()
        self.upload = w.FileUpload(accept="image/*", multiple=True, description=self.text["images"])
        # The inputs that Send reads sync their value once, when they lose focus (the click on Send does that),
        # not at every keystroke or drag step. While the kernel is busy, ipywidgets holds back a model's later
        # updates until it is idle (its message throttling), but the click goes out at once: with continuous
        # updates a fast Send can read a half-typed message (a suspect for the browser test's timeouts with the
        # machine under load, not reproduced on demand: benchmarks/RESULTS.md, session 19).
        self.message = w.Textarea(placeholder=self.text["placeholder"], rows=2, continuous_update=False,
                                  layout=w.Layout(width="50%"))
        self.send = w.Button(description=self.text["send"], button_style="primary")
        self.clear = w.Button(description=self.text["clear"])
        wide_label = {"description_width": "initial"}
        self.temperature = w.FloatSlider(value=0.0, min=0.0, max=1.5, step=0.05, description=self.text["temperature"],
                                         tooltip=self.text["greedy"], style=wide_label, continuous_update=False)
        self.max_new_tokens = w.IntSlider(value=64, min=1, max=512, description=self.text["max_new_tokens"],
                                          style=wide_label, continuous_update=False)
        self.widget = w.VBox([
            w.HBox([self.picker, self.status]), self.transcript, self.thumbnails,
            w.HBox([self.upload, self.message, self.send, self.clear]),
            w.HBox([self.temperature, self.max_new_tokens]),
        ])
        for name in ("picker", "status", "transcript", "thumbnails", "upload", "message", "send", "clear"):
            getattr(self, name).add_class(f"llava-{name}")  # stable CSS hooks for styling and browser tests
        self.upload.observe(self._on_upload, names="value")
        self.picker.observe(self._on_pick, names="value")
        self.send.on_click(self._on_send)
        self.clear.on_click(self._on_clear)
        self._show_status()

    def _ipython_display_(self) -> None:
        from IPython.display import display

        display(self.widget)

    # --- transcript --------------------------------------------------------------------------------

    def _add(self, entry: Entry) -> w.Widget:
        self.entries.append(entry)
        if entry.kind == "image":
            view = w.Image(value=entry.png, format="png", width=THUMBNAIL_PX)
        else:
            view = w.HTML(self._html(entry))
        self.transcript.children = (*self.transcript.children, view)
        return view

    def _html(self, entry: Entry) -> str:
        text = html.escape(entry.text).replace("\n", "<br>")
        if entry.role == "notice":
            return f'<div style="color:#b00">⚠ {text}</div>'
        who = self.text["you"] if entry.role == "user" else "LLaVA"
        return f"<div><b>{who}:</b> {text}</div>"

    def notice(self, text: str) -> None:
        """A message from the UI itself (a refused upload, a failed load), shown in the chat."""
        self._add(Entry("notice", "text", text))

    # --- handlers ----------------------------------------------------------------------------------

    def _on_upload(self, change: dict) -> None:
        files = change["new"]
        if not files:
            return  # our own reset below
        room = min(self.max_images_per_message - len(self.pending),
                   self.max_images_per_chat - len(self.pending) - self._history_images())
        if len(files) > max(room, 0):  # one notice for the lot, not one per refused file
            self.notice(self.text["too_many"].format(refused=len(files) - max(room, 0), sent=len(files),
                                                     per_message=self.max_images_per_message,
                                                     per_chat=self.max_images_per_chat))
            files = files[:max(room, 0)]
        for file in files:
            name, content = file.get("name", "upload"), file.get("content", b"")
            size = max(file.get("size", 0), len(content))
            if size > self.max_upload_bytes:
                self.notice(self.text["too_large"].format(name=name, size=size, limit=self.max_upload_bytes))
                continue
            try:
                image = load_image(bytes(content), name=name, max_pixels=self.max_pixels)
            except ImageError as err:
                self.notice(str(err))
                continue
            self.pending.append(image)
            self.thumbnails.children = (*self.thumbnails.children,
                                        w.Image(value=_png(image), format="png", width=THUMBNAIL_PX))
        self.upload.value = ()  # so the same file can be chosen again

    def _history_images(self) -> int:
        chat = self._chats.get(self.picker.value)
        return len(chat.images) if chat else 0

    def _on_pick(self, change: dict) -> None:
        self._on_clear()
        self._show_status()

    def _on_clear(self, button: w.Button | None = None) -> None:
        """Start over: an empty transcript, no pending images, and the model's history forgotten."""
        if self.picker.value in self._chats:
            self._chats[self.picker.value].reset()
        self.entries.clear()
        self.pending.clear()
        self.transcript.children = ()
        self.thumbnails.children = ()
        self.message.value = ""

    def _show_status(self, extra: str = "") -> None:
        label = self.picker.value
        if label is None:
            self.status.value = f"<i>{self.text['no_model_status']}</i>"
        elif label in self._chats:
            loaded = self._chats[label].loaded
            self.status.value = f"<i>{loaded.kind}, {loaded.device}, {loaded.dtype}</i>".replace("torch.", "")
        else:
            self.status.value = f"<i>{extra or self.text['loads_later']}</i>"

    def _chat(self) -> Chat | None:
        label = self.picker.value
        if label is None:
            self.notice(self.text["no_model"])
            return None
        if label not in self._chats:
            source = self.sources[label]
            self._show_status(self.text["loading"])
            try:
                loaded = self.loader(source)
            except Exception as err:  # a broken folder must not break the UI
                self.notice(self.text["cannot_load"].format(label=label, err=err))
                self._show_status(self.text["load_failed"])
                return None
            self._chats[label] = Chat(loaded)
            self._show_status()
        return self._chats[label]

    def settings(self) -> dict:
        temperature = self.temperature.value
        return {"max_new_tokens": self.max_new_tokens.value, "do_sample": temperature > 0,
                "temperature": temperature if temperature > 0 else 1.0}

    def _on_send(self, button: w.Button | None = None) -> None:
        text = self.message.value.strip()
        if not text:
            self.notice(self.text["empty_message"])
            return
        chat = self._chat()
        if chat is None:
            return
        images, self.pending = self.pending, []
        self.thumbnails.children = ()
        self.message.value = ""
        for image in images:
            self._add(Entry("user", "image", png=_png(image)))
        self._add(Entry("user", "text", text))
        answer = Entry("assistant", "text")
        view = self._add(answer)
        self.send.disabled = True
        try:
            for piece in chat.stream(text, images, **self.settings()):
                answer.text += piece
                view.value = self._html(answer)
        except Exception as err:  # shown in the chat, the conversation stays usable
            self.notice(self.text["generation_failed"].format(err=f"{type(err).__name__}: {err}"))
        finally:
            self.send.disabled = False


def chat_ui(models: Mapping[str, ModelSource] | Sequence[ModelSource] | None = None,
            runs_dir: str | Path | Sequence[str | Path] | None = None, **kwargs) -> ChatUI:
    """Build the chat UI: `models` (paths or loaded models) plus every trained output under `runs_dir`
    (default: the course's runs folder, `launch.runs_dir()`). `lang="zh"` shows the app's labels in Chinese."""
    return ChatUI(models, runs_dir, **kwargs)
