"""Write the tiny world's synthetic data: pretrain (CC3M layout), instruct and held-out eval sets.

    python data_scripts/make_shapes.py --output_dir data/shapes [--seed 0] [--n_pretrain 3000] ...

The tiny world builds this itself on first use (`python -m course_lib.tiny_world`); this script is
for looking at the data, or for a world of another size or seed.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import fields
from pathlib import Path

from course_lib.world.scenes import WorldSpec, write_world


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output_dir", type=Path, required=True)
    for f in fields(WorldSpec):
        if f.type in ("int", "float"):
            parser.add_argument(f"--{f.name}", type=int if f.type == "int" else float, default=f.default)
    args = vars(parser.parse_args(argv))
    out = args.pop("output_dir")
    sizes = write_world(out, WorldSpec(**args))
    print(f"wrote {sizes} to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
