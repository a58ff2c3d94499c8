"""Side venvs for tools whose pins clash with the course's (vLLM, lmms-eval): built once, under a lock."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from course_lib.util.cli import UserError
from course_lib.util.files import exclusive_lock

TORCH = "torch==2.13.0"  # the course's CPU torch: first, so nothing installed after it pulls a CUDA build
READY = ".course_ready"
# PyPI's torchvision, torchaudio and torchcodec are CUDA builds; beside the CPU torch their C libraries do not
# load. transformers imports torchaudio whenever it is installed, so a broken one is removed. torchvision's
# import fails on the two fake-kernel registrations it does not guard ("operator torchvision::nms does not
# exist"); declaring those two op schemas lets it import (its transforms work, nms itself would not). A .pth
# file runs the declaration at the start of every Python process of the venv.
TORCHVISION_SHIM = '''import torch
try:
    torch.ops.torchvision.nms
except (AttributeError, RuntimeError):
    _lib = torch.library.Library("torchvision", "DEF")
    _lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
'''


class VenvError(UserError):
    """A side venv could not be built."""


def _run(cmd: Sequence[str], what: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(list(cmd), capture_output=True, text=True)
    if proc.returncode:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["(no output)"]
        raise VenvError(f"{what} failed: {tail[0]}")
    return proc


def _imports(python: Path, module: str) -> bool:
    return subprocess.run([str(python), "-c", f"import {module}"], capture_output=True).returncode == 0


def side_venv(folder: Path, packages: Sequence[str], flag: str, keep_torchvision: bool = False, log=print) -> Path:
    """A venv at `folder` with the course's CPU torch, then `packages` (torch held at its version); returns
    `folder`. Built once: later calls find its stamp. `flag` names the setting that moves it, for errors."""
    with exclusive_lock(str(folder) + ".lock", flag):
        if (folder / READY).is_file():
            return folder
        log(f"[course_lib] building a venv for {' '.join(packages)} in {folder} (once)")
        python = folder / "bin" / "python"
        _run([sys.executable, "-m", "venv", "--clear", str(folder)], "creating the venv")
        pip = [str(python), "-m", "pip", "install", "-q"]
        _run([*pip, TORCH], f"pip install {TORCH}")
        _run([*pip, *packages, TORCH], f"pip install {' '.join(packages)}")
        broken = [m for m in ("torchaudio", "torchcodec") if not _imports(python, m)]
        if not keep_torchvision and not _imports(python, "torchvision"):
            broken.append("torchvision")  # transformers then uses its PIL image processors
        if broken:
            _run([str(python), "-m", "pip", "uninstall", "-q", "-y", *broken], f"removing {', '.join(broken)}")
        if keep_torchvision and not _imports(python, "torchvision"):
            site = _run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                        "finding site-packages").stdout.strip()
            (Path(site) / "_course_torchvision_ops.py").write_text(TORCHVISION_SHIM)
            (Path(site) / "_course_torchvision_ops.pth").write_text("import _course_torchvision_ops\n")
            _run([str(python), "-c", "import torchvision.transforms.v2"], "importing torchvision")
        (folder / READY).write_text("\n".join(packages) + "\n")
        return folder
