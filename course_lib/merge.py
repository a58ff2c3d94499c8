"""Merge a LoRA output (adapter + trained projector) into its base: a standalone LLaVA folder.

    python -m course_lib.merge --model runs/tiny/finetune_use_lora --out runs/tiny/merged

The result loads with plain `LlavaForConditionalGeneration.from_pretrained`, which is what vLLM and
other servers expect.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from course_lib.serving.loading import PREPROCESSING_FILE, LoadError, load_trained
from course_lib.util.cli import Parser, command
from course_lib.util.files import check_writable

if TYPE_CHECKING:
    from transformers import LlavaForConditionalGeneration


def merge_lora(adapter_dir: str | Path, out: str | Path) -> LlavaForConditionalGeneration:
    """Load base + adapter (the base found from the adapter's own config), fold the LoRA deltas into the
    weights, save model and processor to `out` as safetensors; returns the merged model."""
    from course_lib.model.layout import save_llava
    from course_lib.training.checkpoints import publish_model

    loaded = load_trained(adapter_dir, device="cpu", dtype=torch.float32, merge_lora=True)
    if loaded.kind != "lora":
        raise LoadError(f"--model {adapter_dir}: not a LoRA output (no adapter_config.json); nothing to merge")
    out = Path(out)
    staging = out / ".merge.partial"
    staging.mkdir(parents=True, exist_ok=True)
    save_llava(loaded.model, staging)
    loaded.processor.save_pretrained(staging)
    # How training prepared images travels with the model (pad_to_square, tiling), as in the adapter folder.
    (staging / PREPROCESSING_FILE).write_text(json.dumps(loaded.preprocessing, indent=1))
    publish_model(staging, out)  # an earlier output in `out` (an adapter, say) is replaced, not shadowing
    return loaded.model


@command
def main(argv: list[str] | None = None) -> int:
    parser = Parser(prog="python -m course_lib.merge", description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="a use_lora output folder")
    parser.add_argument("--out", required=True, help="where to write the merged LLaVA")
    args = parser.parse_args(argv)
    check_writable(args.out, "--out", folder=True)
    merge_lora(args.model, args.out)
    print(f"merged LLaVA saved to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
