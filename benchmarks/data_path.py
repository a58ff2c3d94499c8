"""The data path at LLaVA-665K's size, per rank: start-up time and memory, the old path against the index.

    python -m benchmarks.data_path                   # 665,000 records, 2 ranks: about 35 min on 2 CPU cores
    python -m benchmarks.data_path --records 20000   # about 2 min
    python -m benchmarks.data_path --launch          # also a real run_zero2.sh launch on the warm index

It writes a synthetic LLaVA-mix665k (`llava_v1_5_mix665k.json`'s layout and mix: ten sources, multi-turn,
40,688 text-only ShareGPT records, image paths such as coco/train2017/000000033471.jpg) and builds the
real-shaped LLaVA (the real Qwen2.5 tokenizer and chat template, CLIP-L/336's 576 tokens per image). Then
`--ranks` processes start at once, as DeepSpeed's ranks do, and each builds the training dataset:

- `old`: the path up to commit 4c9fb15, reproduced here: every rank parses the whole JSON, keeps every
  normalised sample as Python objects and tokenizes every sample;
- `index, first launch`: `LlavaDataset` on an empty `$HF_DATASETS_CACHE`: one rank writes the data index
  (course_lib/data/index.py) while the others wait for it;
- `index, later launch`: the same again: every rank memory-maps the index.

Each rank prints its seconds from process start (imports included), its resident memory (VmRSS), the part
of it that is private (RssAnon: what each rank pays alone; the index's file pages are shared), its peak
(VmHWM), and the sum of its lengths, a checksum that must be equal across all paths. `--launch` then times a
1-step `run_zero2.sh` run on the warm index, from launch to the first step (train's own log line).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

START = time.time()
REPO = Path(__file__).resolve().parents[1]
WORDS = ("the a of and to in is that it for on with as was at by be this are from or have an they which one you were "
         "her all she there would their we him been has when who will more no if out so said what up its about into "
         "than them can only other new some could time these two may then do first any my now such like our over man "
         "me even most made after also did many before must through back years where much your way well down should "
         "because each just those people how too little state good very make world still own see men work long get "
         "here between both life being under never day same another know while last might us great old year off come "
         "since against go came right used take three image picture photo shows person table red blue green yellow "
         "left behind front sitting standing holding wearing street car dog cat bus sign").split()
# LLaVA-1.5's instruct mix (Liu et al. 2023, "Improved Baselines", Table 7): source, image path layout, records,
# rounds per record, mean words per question and per answer.
MIX = [("llava_instruct", "coco/train2017/{:012d}.jpg", 157712, (1, 5), 12, 60),
       ("sharegpt", None, 40688, (1, 6), 40, 180),
       ("vqav2", "coco/train2017/{:012d}.jpg", 82783, (3, 10), 8, 1),
       ("gqa", "gqa/images/{}.jpg", 72140, (3, 10), 9, 1),
       ("okvqa", "coco/train2017/{:012d}.jpg", 8998, (1, 3), 10, 1),
       ("ocrvqa", "ocr_vqa/images/{}.jpg", 80000, (3, 8), 6, 3),
       ("aokvqa", "coco/train2017/{:012d}.jpg", 66160, (1, 3), 14, 2),
       ("textcaps", "textvqa/train_images/{:016x}.jpg", 21953, (1, 1), 8, 12),
       ("refcoco", "coco/train2017/{:012d}.jpg", 48447, (3, 10), 10, 4),
       ("vg", "vg/VG_100K/{}.jpg", 86417, (3, 10), 10, 4)]
IMAGES_PER_FOLDER = 4  # real photos behind the paths, so a real launch can train on them


def _text(rng: random.Random, mean_words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(int(rng.expovariate(1 / mean_words)) + 1))


def synthetic_mix(total: int, seed: int = 0) -> list[dict]:
    """`total` records in mix665k's proportions and layout, shuffled."""
    rng, scale, records = random.Random(seed), total / sum(m[2] for m in MIX), []
    for name, layout, count, (lo, hi), q_words, a_words in MIX:
        for _ in range(round(count * scale)):
            turns = []
            for t in range(rng.randint(lo, hi)):
                question = _text(rng, q_words) + "?"
                if t == 0 and layout:  # LLaVA puts <image> before or after the first question
                    question = f"<image>\n{question}" if rng.random() < 0.5 else f"{question}\n<image>"
                turns += [{"from": "human", "value": question}, {"from": "gpt", "value": _text(rng, a_words) + "."}]
            record = {"id": f"{name}_{len(records):07d}", "conversations": turns}
            if layout:
                record["image"] = layout.format(rng.randrange(IMAGES_PER_FOLDER))
            records.append(record)
    rng.shuffle(records)
    return records


def write_world(out: Path, total: int, build: bool = True) -> tuple[Path, Path, Path]:
    """(data file, image folder, real-shaped LLaVA folder), reused when already written."""
    from PIL import Image
    from skimage import data as photos

    data_file, images, model = out / f"mix{total}.json", out / "images", out / "real_shaped_llava"
    if not data_file.exists():
        out.mkdir(parents=True, exist_ok=True)
        tmp = data_file.with_suffix(".partial")
        tmp.write_text(json.dumps(synthetic_mix(total)))
        os.replace(tmp, data_file)
    pool = [Image.fromarray(getattr(photos, name)()).convert("RGB") for name in ("astronaut", "coffee", "chelsea",
                                                                                   "rocket")]
    for _, layout, *_ in MIX:
        for k in range(IMAGES_PER_FOLDER if layout else 0):
            path = images / layout.format(k)
            if not path.exists():
                path.parent.mkdir(parents=True, exist_ok=True)
                pool[k % len(pool)].save(path)
    if build and not (model / "config.json").exists():
        from course_lib.build import build_llava

        build_llava("clip-l-336-shaped", "qwen2.5-0.5b-shaped", model, dtype="float32")
    return data_file, images, model


def _memory() -> dict:
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return {k: int(fields[k].split()[0]) / 1024 for k in ("VmRSS", "RssAnon", "RssFile", "VmHWM")}  # MiB


def worker(path: str, data_file: str, images: str, model: str) -> dict:
    """One rank: build the dataset as `path` does; its seconds since process start, memory and checksum."""
    import gc

    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(model)
    gc.collect()
    before, started = _memory(), time.time()
    if path == "old":  # LlavaDataset.__init__ up to 4c9fb15, without its per-sample logging
        from course_lib.data.images import resolve_image_path
        from course_lib.data.labels import PromptEncoder
        from course_lib.data.records import DataError, read_records, to_sample

        encoder, samples, lengths, image_counts = PromptEncoder(processor, "chat"), [], [], []
        records = read_records(data_file)
        for index, record in enumerate(records):
            try:
                sample = to_sample(record, index)
                [resolve_image_path(images, p) for p in sample.images]
                encoded = encoder.truncate(encoder.encode(sample), 2048)
            except DataError:
                continue
            if encoded is not None:
                samples.append(sample)
                lengths.append(len(encoded.input_ids))
                image_counts.append(encoded.n_images)
        del records
        keep = (samples, image_counts)
    else:
        from course_lib.data.dataset import LlavaDataset

        dataset = LlavaDataset(data_file, processor, image_folder=images, template="chat", model_max_length=2048)
        lengths, keep = dataset.lengths, dataset
    gc.collect()
    after = _memory()
    return {"path": path, "rank": int(os.environ.get("RANK", 0)), "samples": len(lengths),
            "lengths_sum": sum(lengths), "data_s": time.time() - started, "since_start_s": time.time() - START,
            **after, "data_MiB": after["VmRSS"] - before["VmRSS"],
            "data_private_MiB": after["RssAnon"] - before["RssAnon"], "kept": type(keep).__name__}


def run_ranks(path: str, ranks: int, files: tuple[Path, Path, Path], cache: Path) -> list[dict]:
    env = {**os.environ, "HF_DATASETS_CACHE": str(cache), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    procs = [subprocess.Popen([sys.executable, "-m", "benchmarks.data_path", "--worker", path, *map(str, files)],
                              cwd=REPO, env={**env, "RANK": str(r)}, stdout=subprocess.PIPE, text=True)
             for r in range(ranks)]
    results = []
    for proc in procs:
        out, _ = proc.communicate()
        if proc.returncode:
            raise SystemExit(f"a {path} rank failed (exit {proc.returncode})")
        results.append(json.loads(out.strip().splitlines()[-1]))
    return results


def launch(files: tuple[Path, Path, Path], cache: Path, ranks: int, out: Path) -> float:
    """A real run_zero2.sh run (1 step; stage 1's trainable set, the chat template's index) on the warm index:
    seconds from launch to its first step."""
    data_file, images, model = files
    env = {**os.environ, "HF_DATASETS_CACHE": str(cache), "NUM_PROCS": str(ranks),
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    cmd = ["bash", "run_zero2.sh", "--stage", "pretrain", "--template", "chat",  # the index the ranks measured
           "--model_name_or_path", str(model), "--data_path", str(data_file), "--image_folder", str(images),
           "--output_dir", str(out / "launch"), "--max_steps", "1", "--per_device_train_batch_size", "1",
           "--save_strategy", "no", "--report_to", "none", "--train_sampling_strategy", "group_by_length"]
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    lines = [line for line in result.stdout.splitlines() if "training starts" in line]
    if result.returncode or not lines:
        raise SystemExit(f"the launch failed (exit {result.returncode}):\n{result.stdout[-3000:]}\n"
                         f"{result.stderr[-3000:]}")
    return float(lines[-1].split("training starts ")[1].split(" s")[0])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.data_path", description=__doc__.split("\n")[0])
    parser.add_argument("--records", type=int, default=665_000)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--out", default="benchmarks/out/data_path")
    parser.add_argument("--skip_old", action="store_true", help="only the index (the old path takes most of the time)")
    parser.add_argument("--launch", action="store_true", help="also time a 1-step run_zero2.sh on the warm index")
    parser.add_argument("--data_only", action="store_true", help="write the data and images, print their paths")
    parser.add_argument("--worker", nargs=4, metavar=("PATH", "DATA", "IMAGES", "MODEL"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(*args.worker)))
        return 0
    from course_lib.util.tables import render_table

    out = Path(args.out)
    files = write_world(out, args.records, build=not args.data_only)
    if args.data_only:
        print(files[0], files[1])
        return 0
    print(f"{args.records:,} records ({files[0].stat().st_size / 2**20:.0f} MiB of JSON), {args.ranks} ranks")
    rows = []
    with tempfile.TemporaryDirectory(prefix="index-cache-") as cache:
        plan = ([] if args.skip_old else [("old", "old")]) + [("index", "index, first launch"),
                                                             ("index", "index, later launch")]
        for path, label in plan:
            results = run_ranks(path, args.ranks, files, Path(cache))
            for r in results:
                rows.append({**r, "path": label})
                print(f"{label}, rank {r['rank']}: data {r['data_s']:.1f} s, ready {r['since_start_s']:.1f} s after "
                      f"start, RSS {r['VmRSS']:.0f} MiB (private {r['RssAnon']:.0f}), peak {r['VmHWM']:.0f} MiB; "
                      f"the data added {r['data_MiB']:.0f} MiB ({r['data_private_MiB']:.0f} private)",
                      flush=True)
        sums = {r["lengths_sum"] for r in rows}
        launch_s = launch(files, Path(cache), args.ranks, out) if args.launch else None
    headers = ["path", "rank", "samples", "data s", "ready s", "data MiB", "data private MiB", "RSS MiB", "peak MiB"]
    print("\n" + render_table(headers, [[r["path"], str(r["rank"]), f"{r['samples']:,}", f"{r['data_s']:.1f}",
                                         f"{r['since_start_s']:.1f}", f"{r['data_MiB']:.0f}",
                                         f"{r['data_private_MiB']:.0f}", f"{r['VmRSS']:.0f}", f"{r['VmHWM']:.0f}"]
                                        for r in rows]))
    print(f"the same sum of lengths on every path and rank: {len(sums) == 1}")
    if launch_s is not None:
        print(f"run_zero2.sh on the warm index: training starts {launch_s:.1f} s after launch")
    (out / "results.json").write_text(json.dumps({"records": args.records, "ranks": args.ranks, "rows": rows,
                                                  "launch_to_first_step_s": launch_s}, indent=1))
    return 0 if len(sums) == 1 else 1


if __name__ == "__main__":
    sys.exit(main())
