"""Score a course model with lmms-eval, the harness practitioners report LLaVA numbers with, next to
`course_lib.eval`, question by question.

    python -m course_lib.lmms --model runs/tiny/finetune_none --data eval/eval.json --images eval/images --limit 50

lmms-eval (0.7.3, which pins its own transformers) gets a venv of its own, built once under
~/.cache/course_lib (COURSE_LMMS_VENV moves it). The held-out set becomes a local lmms-eval task (a YAML, a
JSON-lines copy of the records, and the task's `utils.py` with this course's answer normalisation, copied
from course_lib.eval's source). The model is lmms-eval's own `llava_hf`, which loads the output folder
unchanged; a LoRA output must be merged first (`python -m course_lib.merge`). Both tools answer greedily,
16 new tokens, with the folder's chat template, so the verdicts must agree; every question where they do not
is listed with the reason when it is known.

lmms-eval 0.7.3's chat `llava_hf` cannot answer a text-only question: it hands the processor `images=[]`, CLIP
fails on the empty batch, and lmms-eval logs the error and scores an empty answer.
"""

from __future__ import annotations

import inspect
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from course_lib.util.cli import Parser, UserError, command
from course_lib.util.files import atomic_write_json

LMMS_EVAL = "lmms-eval==0.7.3"
# llava_hf imports decord without declaring it; filelock 4 removed a module lmms-eval 0.7.3 imports.
EXTRAS = ("decord==0.6.0", "filelock<4")
DEFAULT_VENV = Path.home() / ".cache" / "course_lib" / "lmms-eval-0.7.3"
TASK = "course_eval"
TEXT_ONLY_BUG = ("lmms-eval 0.7.3's llava_hf fails on a question without an image (the processor gets images=[]) "
                 "and scores an empty answer")

TASK_YAML = """task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_messages: !function utils.doc_to_messages
doc_to_target: answer
generation_kwargs:
  max_new_tokens: {max_new_tokens}
  temperature: 0
  top_p: null
  num_beams: 1
  do_sample: false
process_results: !function utils.process_results
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
metadata:
  version: 0.0
"""

TASK_UTILS = '''"""The course_eval task: prompts as course_lib.eval builds them, scored as it scores."""
import re
import string

from PIL import Image, ImageOps

ARTICLES = {articles!r}
NUMBER_WORDS = {number_words!r}


{normalize}

def doc_to_visual(doc):
    return [ImageOps.exif_transpose(Image.open(p)).convert("RGB") for p in doc["images"]]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return doc["question"]  # with its <image> placeholders: the simple llava_hf then adds none of its own


def doc_to_messages(doc, lmms_eval_specific_kwargs=None):
    # The course's chat template renders each image item as "<image>\\n" before the text, as the records do.
    text = doc["question"].replace("<image>\\n", "").replace("<image>", "")
    return [{{"role": "user", "content": [*({{"type": "image", "url": im}} for im in doc_to_visual(doc)),
                                         {{"type": "text", "text": text}}]}}]


def process_results(doc, results):
    return {{"exact_match": float(normalize_answer(results[0] if results else "") == normalize_answer(doc["answer"]))}}
'''


class HarnessError(UserError):
    """lmms-eval could not be installed or run."""


def lmms_venv() -> Path:
    return Path(os.environ.get("COURSE_LMMS_VENV", DEFAULT_VENV))


def ensure_lmms(log=print) -> Path:
    """The venv with lmms-eval, built once (about 2 minutes and 2.5 GB); returns its folder."""
    from course_lib.util.venvs import side_venv

    return side_venv(lmms_venv(), [LMMS_EVAL, *EXTRAS], "COURSE_LMMS_VENV", log=log)


def write_task(items: list, folder: Path) -> list[dict]:
    """`course_lib.eval` items (one question each) as a local lmms-eval task in `folder`; returns its rows."""
    from course_lib import eval as course_eval

    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for item in items:
        if len(item.messages) != 1:
            raise HarnessError(f"question {item.id}: {len(item.messages)} turns before the answer; the lmms-eval "
                               "task takes single-turn questions")
        rows.append({"id": item.id, "type": item.type, "question": item.messages[0]["content"],
                     "answer": item.answer, "images": [str(p) for p in item.images]})
    (folder / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / f"{TASK}.yaml").write_text(TASK_YAML.format(task=TASK, data=folder / "eval.jsonl",
                                                          max_new_tokens=course_eval.MAX_NEW_TOKENS))
    (folder / "utils.py").write_text(TASK_UTILS.format(
        articles=course_eval.ARTICLES, number_words=course_eval.NUMBER_WORDS,
        normalize=inspect.getsource(course_eval.normalize_answer)))
    return rows


def run_lmms_eval(model: Path, task_dir: Path, rows: list[dict], out: Path, venv: Path) -> dict[str, str]:
    """lmms-eval's `llava_hf` on the task (`rows`, as `write_task` wrote them), offline, on CPU; returns
    {question id: its answer}."""
    cmd = [str(venv / "bin" / "python"), "-m", "lmms_eval", "eval", "--model", "llava_hf", "--model_args",
           f"pretrained={model},dtype=float32,device_map=cpu", "--tasks", TASK, "--include_path", str(task_dir),
           "--device", "cpu", "--batch_size", "1", "--log_samples", "--output_path", str(out)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "HF_DATASETS_CACHE": str(out / "datasets_cache")}
    shutil.rmtree(out, ignore_errors=True)  # a samples file of an earlier run (another model) must not be read
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    samples = sorted(out.rglob(f"*_samples_{TASK}.jsonl"))
    if not samples:  # lmms-eval exits 0 even when the run failed: its samples file is the proof
        lines = [line for line in (proc.stderr + proc.stdout).splitlines() if "Error" in line]
        raise HarnessError(f"lmms-eval wrote no answers (exit {proc.returncode}): "
                           f"{lines[-1].strip() if lines else 'no error line in its output'}")
    answers = {}
    for line in samples[-1].read_text().splitlines():
        sample = json.loads(line)
        response = sample.get("filtered_resps") or sample.get("resps") or [""]
        while isinstance(response, list):
            response = response[0] if response else ""
        answers[rows[int(sample["doc_id"])]["id"]] = response
    return answers


def compare(rows: list[dict], ours: dict[str, str], theirs: dict[str, str]) -> dict:
    """Question by question: both verdicts, and for each disagreement its reason when known."""
    from course_lib.eval import is_correct

    table, differences = [], []
    for row in rows:
        a, b = ours[row["id"]], theirs.get(row["id"], "")
        ok_a, ok_b = is_correct(a, row["answer"]), is_correct(b, row["answer"])
        table.append({"id": row["id"], "type": row["type"], "course_lib": a, "lmms_eval": b, "course_lib_correct": ok_a,
                      "lmms_eval_correct": ok_b})
        if ok_a != ok_b:
            reason = TEXT_ONLY_BUG if not row["images"] and b == "" else "unexplained"
            differences.append({"id": row["id"], "course_lib": a, "lmms_eval": b, "reason": reason})
    n = len(rows)
    return {"n": n, "course_lib_accuracy": sum(r["course_lib_correct"] for r in table) / n,
            "lmms_eval_accuracy": sum(r["lmms_eval_correct"] for r in table) / n,
            "same_verdict": sum(r["course_lib_correct"] == r["lmms_eval_correct"] for r in table),
            "same_answer": sum(r["course_lib"].strip() == r["lmms_eval"].strip() for r in table),
            "differences": differences, "questions": table}


def score_both(model: str | Path, data: str | Path, images: str | Path | None, work: Path,
               limit: int | None = None, log=print) -> dict:
    """course_lib.eval and lmms-eval on the same model and questions; `compare`'s report."""
    from course_lib import eval as course_eval
    from course_lib.serving.loading import checkpoint_kind, load_trained

    model = Path(model).resolve()
    if checkpoint_kind(model) == "lora":
        raise HarnessError(f"--model {model}: a LoRA output; lmms-eval's llava_hf loads full models only: "
                           f"merge it first (python -m course_lib.merge --model {model} --out MERGED)")
    items = course_eval.load_items(data, images, limit)
    rows = write_task(items, work / "task")
    venv = ensure_lmms(log)
    theirs = run_lmms_eval(model, work / "task", rows, work / "lmms_eval", venv)
    report = course_eval.evaluate(load_trained(model, device="cpu"), items, progress=False)
    return compare(rows, {p["id"]: p["prediction"] for p in report["predictions"]}, theirs)


@command
def main(argv: list[str] | None = None) -> int:
    parser = Parser(prog="python -m course_lib.lmms", description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="a full or merged training output")
    parser.add_argument("--data", required=True, help="a LLaVA-format eval set with answers")
    parser.add_argument("--images", help="its image folder")
    parser.add_argument("--limit", type=int, help="the first N questions")
    parser.add_argument("--work", default="runs/lmms_eval", help="where the task and lmms-eval's logs go")
    parser.add_argument("--out", help="write the comparison here (JSON)")
    args = parser.parse_args(argv)
    report = score_both(args.model, args.data, args.images, Path(args.work), args.limit)
    print(f"{report['n']} questions: course_lib.eval {report['course_lib_accuracy']:.1%}, lmms-eval "
          f"{report['lmms_eval_accuracy']:.1%}; same verdict on {report['same_verdict']}, same answer on "
          f"{report['same_answer']}")
    for d in report["differences"]:
        print(f"  {d['id']}: course_lib {d['course_lib']!r}, lmms-eval {d['lmms_eval']!r}: {d['reason']}")
    if args.out:
        atomic_write_json(args.out, report, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
