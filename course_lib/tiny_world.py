"""`python -m course_lib.tiny_world`: build the tiny world once, then print its folders as shell variables.

    eval "$(python -m course_lib.tiny_world)"   # sets TINY_ROOT, TINY_DATA, TINY_TOKENIZER, TINY_CLIP, TINY_LLM

The world itself is built by `course_lib.world.backbones`.
"""

from __future__ import annotations

import shlex
import sys

from course_lib.util.cli import Parser, command
from course_lib.world.backbones import ensure_tiny_world


@command
def main(argv: list[str] | None = None) -> int:
    Parser(prog="python -m course_lib.tiny_world", description=__doc__.split("\n")[0]).parse_args(argv)
    world = ensure_tiny_world()
    for name in ("root", "data", "tokenizer", "clip", "llm"):
        # Quoted for `eval "$(...)"`: a space or `$(...)` in $COURSE_LIB_HOME stays a path, never code.
        print(f"TINY_{name.upper()}={shlex.quote(str(getattr(world, name)))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
