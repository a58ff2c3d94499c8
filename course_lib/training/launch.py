"""Run `run_zero2.sh` from Python (the notebooks), streaming its output, and find the course's folders."""

from __future__ import annotations

import os
import subprocess
import sys
from collections import deque
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]  # course_lib/training/launch.py -> the repository


class LaunchError(RuntimeError):
    pass


def runs_dir() -> Path:
    """Where the course's trained models go: `$COURSE_LIB_RUNS`, else `runs/tiny` in the repo."""
    return Path(os.environ.get("COURSE_LIB_RUNS", REPO / "runs" / "tiny"))


def run_zero2(*flags: str, quiet: bool = True, ranks: int | None = None) -> None:
    """`bash run_zero2.sh FLAGS...` with this Python first on PATH; raises LaunchError on failure.

    With `quiet`, only the launcher's own lines, losses and the final summary are shown; the full log
    is kept and its tail is put into the error if the run fails. `ranks` sets the number of CPU ranks
    (run_zero2.sh's NUM_PROCS; its default is 2); on GPUs the script uses every GPU it sees.
    """
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    if ranks is not None:
        env["NUM_PROCS"] = str(ranks)
    cmd = ["bash", str(REPO / "run_zero2.sh"), *map(str, flags)]
    print("$", " ".join(cmd[1:]), flush=True)
    tail: deque[str] = deque(maxlen=40)
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env) as proc:
        for line in proc.stdout:
            tail.append(line)
            if not quiet or _worth_showing(line):
                print(line.rstrip()[-200:], flush=True)
    if proc.returncode:
        raise LaunchError(f"run_zero2.sh exited with {proc.returncode}; last lines:\n{''.join(tail)}")


def _worth_showing(line: str) -> bool:
    keep = ("[course_lib.train]", "[run_zero2]", "error", "'loss'", " finished", " steps ", " samples ",
            " tokens ", " time ", " final loss", " model ", " loss curve", "====", "module ", "vision_tower",
            "multi_modal_projector", "language_model", "lm_head", "total ")
    return any(k in line for k in keep) and "it/s]" not in line
