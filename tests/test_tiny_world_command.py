"""`python -m course_lib.tiny_world` prints shell assignments that `eval` reads back as paths, never as code."""

import os
import subprocess
import sys
from pathlib import Path


def test_printed_folders_survive_eval_with_spaces_and_command_substitution(tmp_path, tiny_world):
    # A COURSE_LIB_HOME whose name holds a space and a command substitution: a symlink to the real cache,
    # so nothing is rebuilt. Unquoted, `eval` would run `touch` and create the marker file.
    marker = tmp_path / "pwned"
    home = tmp_path / "my cache $(touch pwned)"
    home.symlink_to(tiny_world.root.parent, target_is_directory=True)
    env = {**os.environ, "COURSE_LIB_HOME": str(home)}
    printed = subprocess.run([sys.executable, "-m", "course_lib.tiny_world"], env=env, capture_output=True,
                             text=True, check=True).stdout
    shell = subprocess.run(["bash", "-c", 'eval "$1"; printf "%s\\n" "$TINY_DATA" "$TINY_LLM"', "_", printed],
                           cwd=tmp_path, capture_output=True, text=True, check=True).stdout.splitlines()
    assert not marker.exists()
    assert shell == [str(home / tiny_world.root.name / "data"), str(home / tiny_world.root.name / "qwen2")]
    assert Path(shell[0]).is_dir()
