"""fp32, bf16 autocast and a bf16 model on one CPU training step of the tiny stage 2, in one process.

    python -m benchmarks.bf16_step --model runs/tiny/pretrain [--batches 12] [--rounds 2]

The step is notebook 06's: freeze_vision from the stage-1 model, batches of 32 random instruct samples packed
into one flat row (per-sample SDPA), AdamW. Each mode runs `--rounds` times, alternating; a round's time is the
median of its steps after two warm-up steps; the best round is compared. No DeepSpeed: this is the bare step, the
upper bound of what bf16 can give a run (DeepSpeed's bf16 mode adds fp32 master weights on top).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

MODES = ("fp32", "autocast", "bf16")


def main(argv: list[str] | None = None) -> None:
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from course_lib.data.collators import PackedCollator
    from course_lib.data.dataset import LlavaDataset
    from course_lib.model.packed_attention import use_for_packing
    from course_lib.training.trainable import prepare_model
    from course_lib.world import ensure_tiny_world

    parser = argparse.ArgumentParser(prog="python -m benchmarks.bf16_step", description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a stage-1 model folder, e.g. runs/tiny/pretrain")
    parser.add_argument("--batches", type=int, default=12)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args(argv)

    world = ensure_tiny_world()
    processor = AutoProcessor.from_pretrained(args.model)
    data = LlavaDataset(world.data / "instruct" / "instruct.json", processor, world.data / "instruct" / "images",
                        template="chat")
    collator = PackedCollator(max_tokens=2048 * 32, row_tokens=None, pad_token_id=processor.tokenizer.pad_token_id)
    gen = torch.Generator().manual_seed(0)
    batches = [collator([data[int(i)] for i in torch.randperm(len(data), generator=gen)[:32]])
               for _ in range(args.batches)]

    best: dict[str, float] = {}
    for _ in range(args.rounds):
        for mode in MODES:
            model = LlavaForConditionalGeneration.from_pretrained(
                args.model, dtype=torch.bfloat16 if mode == "bf16" else torch.float32)
            model.config.text_config.use_cache = False
            assert use_for_packing(model)
            model = prepare_model(model, "finetune", "freeze_vision")
            optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
            seconds = []
            for k, batch in enumerate(batches):
                start = time.perf_counter()
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == "autocast"):
                    loss = model(**batch).loss
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                if k >= 2:
                    seconds.append(time.perf_counter() - start)
            step = statistics.median(seconds)
            best[mode] = min(best.get(mode, step), step)
            print(f"{mode:9s} {step:.3f} s a step, last loss {loss.item():.4f}", flush=True)
    for mode in MODES:
        print(f"{mode:9s} best {best[mode]:.3f} s: {best['fp32'] / best[mode]:.2f}x fp32")


if __name__ == "__main__":
    main()
