"""`python -m course_lib.tiny_world`: build the tiny world once, then print its folders as shell variables.

    eval "$(python -m course_lib.tiny_world)"   # sets TINY_ROOT, TINY_DATA, TINY_TOKENIZER, TINY_CLIP, TINY_LLM

The world itself is built by `course_lib.world.backbones`.
"""

from __future__ import annotations

import shlex

from course_lib.world.backbones import ensure_tiny_world


def main() -> None:
    world = ensure_tiny_world()
    for name in ("root", "data", "tokenizer", "clip", "llm"):
        # Quoted for `eval "$(...)"`: a space or `$(...)` in $COURSE_LIB_HOME stays a path, never code.
        print(f"TINY_{name.upper()}={shlex.quote(str(getattr(world, name)))}")


if __name__ == "__main__":
    main()
