"""Training speed, padded vs packed, measured side by side: `python -m benchmarks.packing` (`make bench`).

    python -m benchmarks.packing                      # CPU, the tiny geometry, ~3 min on 2 cores
    python -m benchmarks.packing --quick              # ~1 min (notebook 08)
    python -m benchmarks.packing --attn sdpa_packed   # packed rows attend per sample (no cross-sample work)
    python -m benchmarks.packing --device cuda --geometry qwen2.5-0.5b --dtype bfloat16 \\
        --attn flash_attention_2 --gradient_checkpointing true

Three parts, each printed as a table and drawn into --out (PNG + results.json):
1. throughput: reference (left-padded random batches) vs grouped vs packed, same model and samples,
   alternating, --repeats rounds, medians;
2. data pipeline (tiny world only): samples/s of LlavaDataset + collator with 0, 1, 2 workers against
   what the training step consumes;
3. cost growth: step time against tokens per batch and against images per sample.

The last two lines are always `speedup: X.XX` (packed over reference real-token throughput, median of
the per-round ratios) and `packed real tokens: YY%`; the line before them is `packed over grouped: Z.ZZ`.
See course_lib/lessons/speed.py for the method.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from datetime import date
from pathlib import Path

import torch

from course_lib.lessons import plots, speed
from course_lib.util.tables import render_table


def _bool(text: str) -> bool:
    if text.lower() not in ("true", "false", "1", "0"):
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
    return text.lower() in ("true", "1")


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.packing", description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--geometry", default="tiny", choices=sorted(speed.GEOMETRIES))
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--attn", default="sdpa",
                        choices=["sdpa", "sdpa_packed", "eager", "flash_attention_2", "flex_attention"],
                        help="sdpa_packed: SDPA per sample inside packed rows (course_lib.model.packed_attention)")
    parser.add_argument("--gradient_checkpointing", type=_bool, default=False)
    parser.add_argument("--samples", type=int, default=96)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="fewer samples and rounds, no cost-growth part")
    parser.add_argument("--skip", nargs="*", default=[], choices=["loader", "growth"])
    parser.add_argument("--out", default="benchmarks/out")
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here")
    if args.quick:
        args.samples, args.repeats = min(args.samples, 48), min(args.repeats, 3)
    return args


def loader_part(out: Path) -> dict:
    """Data pipeline on the tiny world: LlavaDataset + PaddedCollator vs the tiny model's step."""
    from course_lib.build import build_llava
    from course_lib.data.collators import PaddedCollator
    from course_lib.data.dataset import LlavaDataset
    from course_lib.world import ensure_tiny_world

    world = ensure_tiny_world()
    model, processor = build_llava(str(world.clip), str(world.llm))
    dataset = LlavaDataset(world.data / "instruct" / "instruct.json", processor, template="chat")
    collator = PaddedCollator(processor.tokenizer.pad_token_id)
    rates = speed.loader_rates(dataset, collator)
    consumed = speed.step_rate(model, dataset, collator)
    plots.plot_loader(rates, consumed).savefig(out / "loader.png", dpi=100)
    print("\ndata pipeline (tiny world, batch 16): samples/s")
    for r in rates:
        print(f"  {r['workers']} workers: {r['samples_per_s']:8.0f}   ({r['samples_per_s'] / consumed:.1f}x the step)")
    print(f"  training step consumes {consumed:.0f} samples/s")
    return {"rates": rates, "step_samples_per_s": consumed}


def _rates(result: dict) -> str:
    """'fp32 0.160, bf16 1.075 TFLOP/s' (older results.json files have only matmul_tflops)."""
    rates = result.get("matmul_tflops_by_dtype", {result["dtype"]: result["matmul_tflops"]})
    return ", ".join(f"{name} {rate:.3f}" for name, rate in rates.items()) + " TFLOP/s"


def markdown(report: dict) -> str:
    """The run as a RESULTS.md section: environment, command, and every table, from results.json."""
    env, result = report["env"], report["throughput"]
    lines = [f"### {env['date']}: {result['geometry']} on {result['device']} ({env['device_name']}, "
             f"{env['threads']} threads), {result['dtype']}, {result['attn']}",
             "", f"`{env['command']}` (python {env['python']}, torch {env['torch']}, transformers "
             f"{env['transformers']})", "",
             f"{result['samples']} samples, mean {result['mean_length']:.0f} tokens, max {result['max_length']}; "
             f"batch {result['batch_size']} vs {result['rows_per_step']} packed rows of {result['row_tokens']}; "
             f"median of {result['repeats']} alternating rounds; MFU against the best measured matmul rate, "
             f"{_rates(result)}.", "",
             speed.format_throughput(result, markdown=True)]
    if "loader" in report:
        loader = report["loader"]
        body = [[f"{r['workers']} workers", f"{r['samples_per_s']:.0f}",
                 f"{r['samples_per_s'] / loader['step_samples_per_s']:.1f}x"] for r in loader["rates"]]
        body.append(["training step consumes", f"{loader['step_samples_per_s']:.0f}", "1.0x"])
        lines += ["", render_table(["data pipeline (tiny world, batch 16)", "samples/s", "vs the step"], body, True)]
    if "growth" in report:
        growth = report["growth"]
        body = [[f"{r['tokens'] // 256} text rows of 256", str(r["tokens"]), f"{r['seconds']:.3f}"]
                for r in growth["by_tokens"]]
        body += [[f"4 samples x {r['images_per_sample']} images ({growth['image_tokens']} tok each)", str(r["tokens"]),
                  f"{r['seconds']:.3f}"] for r in growth["by_images"]]
        lines += ["", render_table(["cost growth", "tokens per batch", "step seconds"], body, True)]
    lines += ["", *closing_lines(result), ""]
    return "\n".join(lines)


def closing_lines(result: dict) -> list[str]:
    """The ratios the benchmark ends with; packed in one flat row only where the attention skips cross-sample work."""
    ratios = result["speedup_vs_reference"]
    one_row = ratios.get("packed-1row")
    return ([f"packed in one flat row over grouped: {one_row / ratios['grouped']:.2f}"] if one_row else []) + [
        f"packed over grouped: {ratios['packed'] / ratios['grouped']:.2f}", f"speedup: {ratios['packed']:.2f}",
        f"packed real tokens: {result['modes']['packed']['real_share']:.0%}"]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    dtype = getattr(torch, args.dtype)
    geometry = speed.GEOMETRIES[args.geometry]
    import transformers

    env = {"date": date.today().isoformat(), "python": platform.python_version(), "torch": torch.__version__,
           "transformers": transformers.__version__, "threads": torch.get_num_threads(),
           "device_name": torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor()
           or platform.machine(), "command": "python -m benchmarks.packing " + " ".join(argv or sys.argv[1:])}
    print(f"{env['command']}\n{env}")
    result = speed.throughput(geometry, n_samples=args.samples, batch_size=args.batch_size, repeats=args.repeats,
                              device=args.device, dtype=dtype, attn=args.attn,
                              gradient_checkpointing=args.gradient_checkpointing, progress=print)
    print(f"\nthroughput: {geometry.name}, {args.samples} samples (mean {result['mean_length']:.0f} tokens, "
          f"max {result['max_length']}), batch {args.batch_size} vs {result['rows_per_step']} packed rows of "
          f"{geometry.row_tokens}; median of {args.repeats} rounds; MFU against the best matmul rate: {_rates(result)}")
    print(speed.format_throughput(result))
    plots.plot_throughput(result).savefig(out / "throughput.png", dpi=100)
    report = {"env": env, "throughput": result}
    if "loader" not in args.skip and args.geometry == "tiny" and not args.quick:
        report["loader"] = loader_part(out)
    if "growth" not in args.skip and not args.quick:
        growth = speed.cost_growth(geometry, device=args.device, dtype=dtype, attn=args.attn)
        plots.plot_cost_growth(growth).savefig(out / "cost_growth.png", dpi=100)
        print("\ncost growth: step seconds")
        for r in growth["by_tokens"]:
            print(f"  {r['tokens']:>5} tokens per batch: {r['seconds']:.3f}")
        for r in growth["by_images"]:
            print(f"  {r['images_per_sample']} images per sample ({r['tokens']} tokens): {r['seconds']:.3f}")
        report["growth"] = growth
    (out / "results.json").write_text(json.dumps(report, indent=1))
    (out / "summary.md").write_text(markdown(report))
    print("\n" + "\n".join(closing_lines(result)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
