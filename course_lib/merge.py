"""Merge a LoRA output (adapter + trained projector) into its base: a standalone LLaVA folder.

    python -m course_lib.merge --model runs/tiny/finetune_use_lora --out runs/tiny/merged

The result loads with plain `LlavaForConditionalGeneration.from_pretrained`, which is what vLLM and
other servers expect.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


class MergeError(ValueError):
    pass


def merge_lora(adapter_dir: str | Path, out: str | Path):
    """Load base + adapter, fold the LoRA deltas into the weights, save to `out`; returns the model."""
    from peft import PeftModel
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    adapter_dir = Path(adapter_dir)
    config_file = adapter_dir / "adapter_config.json"
    if not config_file.is_file():
        raise MergeError(f"--model {adapter_dir}: no adapter_config.json; expected a use_lora output folder")
    base = json.loads(config_file.read_text()).get("base_model_name_or_path")
    if not base or not (Path(base) / "config.json").is_file():
        raise MergeError(f"--model {adapter_dir}: its base model {base!r} (from adapter_config.json) is missing")
    model = LlavaForConditionalGeneration.from_pretrained(base)
    model = PeftModel.from_pretrained(model, adapter_dir).merge_and_unload()
    model.save_pretrained(out)
    AutoProcessor.from_pretrained(adapter_dir).save_pretrained(out)
    return model


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m course_lib.merge", description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="a use_lora output folder")
    parser.add_argument("--out", required=True, help="where to write the merged LLaVA")
    args = parser.parse_args(argv)
    try:
        merge_lora(args.model, args.out)
    except MergeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"merged LLaVA saved to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
