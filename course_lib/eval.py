"""Score trained LLaVAs on a LLaVA-format set with reference answers, per question type.

    python -m course_lib.eval --model runs/tiny/finetune_use_lora --model runs/tiny/finetune_none \\
        --data eval/eval.json --images eval/images --out report.json --limit 100

Records are read and checked by the training data code (`records`, `images`), so a question is
prompted exactly as training formatted it: every turn up to the last user turn, `<image>`
placeholders in place. The reference is `record["answer"]`, or else the last gpt turn. A prediction
counts when it equals the reference after normalisation (lowercase, no punctuation or articles,
number words as digits): the exact match of the VQA-style short-answer benchmarks LLaVA-1.5 reports
(https://visualqa.org/evaluation.html). Answers are generated greedily in batches. Several `--model`s
give the train-type comparison: one column each.
"""

from __future__ import annotations

import re
import string
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from course_lib.data.images import load_image, resolve_image_path
from course_lib.data.records import DataError, duplicate_ids, locate_data, read_records, record_id, to_sample
from course_lib.serving.generation import GenerationSettings, generate_replies
from course_lib.serving.loading import LoadedModel, load_trained
from course_lib.util.cli import Parser, UserError, command
from course_lib.util.files import atomic_write_json, check_writable
from course_lib.util.tables import render_table

ARTICLES = {"a", "an", "the"}
NUMBER_WORDS = {w: str(i) for i, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
    "seventeen eighteen nineteen twenty".split())}
ALL = "all"


MAX_NEW_TOKENS = 16  # the scoreboard's answers are a word or two

def normalize_answer(text: str) -> str:
    """`"Two circles."` -> `"2 circles"`: lowercase, no punctuation or articles, digits for number words."""
    text = text.lower().replace("'", "")
    text = re.sub(r"(?<!\d)\.|\.(?!\d)", " ", text)  # keep decimal points: "2.5" stays a number
    text = text.translate(str.maketrans({c: " " for c in string.punctuation if c != "."}))
    return " ".join(NUMBER_WORDS.get(word, word) for word in text.split() if word not in ARTICLES)


def is_correct(prediction: str, reference: str) -> bool:
    return normalize_answer(prediction) == normalize_answer(reference)


@dataclass(frozen=True)
class EvalItem:
    """One scored question: the prompt (every turn up to the last user turn), its images, the reference."""

    id: str
    type: str
    messages: tuple[dict, ...]
    images: tuple[Path, ...]
    answer: str


def to_item(record: dict, index: int, image_folder: str | Path) -> EvalItem:
    """Parse a record exactly as training does (`records.to_sample`), then split off the question."""
    sample = to_sample(record, index)  # three formats, role order, one placeholder per image
    last_user = max(i for i, m in enumerate(sample.messages) if m["role"] == "user")
    # String contents with `<image>` placeholders: the same prompt text as the training template renders.
    answer = str(record["answer"]) if "answer" in record else sample.messages[-1]["content"]
    images = tuple(resolve_image_path(image_folder, name) for name in sample.images)
    return EvalItem(sample.id, str(record.get("type", ALL)), sample.messages[:last_user + 1], images, answer)


def load_items(data_path: str | Path, image_folder: str | Path | None = None,
               limit: int | None = None) -> list[EvalItem]:
    """The first `limit` records of a LLaVA-format file as EvalItems; a bad record or missing image is
    a DataError naming it, raised before any model is loaded."""
    data_file, image_folder = locate_data(data_path, image_folder)
    records = read_records(data_file)[:limit]
    repeated = duplicate_ids(records)
    if repeated:  # answers are joined to records by id: a repeated one would score the wrong answer
        raise DataError("duplicate_id", f"{data_file}: {len(repeated)} ids are used more than once (first: "
                                        f"{repeated[0]!r}); an eval set needs unique ids")
    items = []
    for index, record in enumerate(records):
        try:
            item = to_item(record, index, image_folder)
            missing = [p for p in item.images if not p.is_file()]
            if missing:
                raise DataError("missing_image", f"image file {missing[0]} does not exist")
        except DataError as err:
            raise err.about(record_id(record, index), data_file) from None
        items.append(item)
    return items


def score(rows: Sequence[dict]) -> dict:
    """Accuracy overall and per type from rows with `type`, `answer` and `prediction`."""
    groups: dict[str, list[bool]] = {}
    for row in rows:
        hit = is_correct(row["prediction"], row["answer"])
        groups.setdefault(row.get("type", ALL), []).append(hit)
    by_type = {t: {"n": len(h), "correct": sum(h), "accuracy": sum(h) / len(h)} for t, h in sorted(groups.items())}
    hits = [h for group in groups.values() for h in group]
    return {"n": len(hits), "correct": sum(hits), "accuracy": sum(hits) / len(hits) if hits else 0.0,
            "by_type": by_type}


def predict(loaded: LoadedModel, items: Sequence[EvalItem], batch_size: int = 8, max_new_tokens: int = MAX_NEW_TOKENS,
            progress: bool = True) -> list[dict]:
    """Greedy answers in batches; one row per item with its question, answer, prediction and verdict."""
    settings = GenerationSettings(max_new_tokens=max_new_tokens)
    rows = []
    with tqdm(total=len(items), desc=f"eval {loaded.name}", unit="q", disable=not progress) as bar:
        for start in range(0, len(items), batch_size):
            batch = items[start:start + batch_size]
            images = [[load_image(path) for path in item.images] for item in batch]
            predictions = generate_replies(loaded, [list(item.messages) for item in batch], images, settings)
            for item, prediction in zip(batch, predictions, strict=True):
                rows.append({"id": item.id, "type": item.type, "question": item.messages[-1]["content"],
                             "answer": item.answer, "prediction": prediction,
                             "correct": is_correct(prediction, item.answer)})
            bar.update(len(batch))
    return rows


def evaluate(loaded: LoadedModel, items: Sequence[EvalItem], max_new_tokens: int = MAX_NEW_TOKENS, **kwargs) -> dict:
    """A report: the scores (overall and `by_type`), the generation settings used, and every prediction."""
    rows = predict(loaded, items, max_new_tokens=max_new_tokens, **kwargs)
    generation = GenerationSettings(max_new_tokens=max_new_tokens).as_dict()
    return {"model": str(loaded.path), "kind": loaded.kind, **score(rows), "generation": generation,
            "predictions": rows}


def format_table(reports: Sequence[dict]) -> str:
    """Accuracy per question type, one column per model: the train-type comparison at a glance."""
    names = [Path(r["model"]).name for r in reports]
    if len(set(names)) < len(names):
        names = [r["model"] for r in reports]
    types = sorted({t for r in reports for t in r["by_type"]})
    header = ["type", "n", *names]
    body = [[t, str(reports[0]["by_type"].get(t, {}).get("n", 0)),
             *(f"{100 * r['by_type'][t]['accuracy']:.1f}%" if t in r["by_type"] else "-" for r in reports)]
            for t in types]
    body.append([ALL, str(reports[0]["n"]), *(f"{100 * r['accuracy']:.1f}%" for r in reports)])
    return render_table(header, body)


@command
def main(argv: list[str] | None = None) -> int:
    parser = Parser(prog="python -m course_lib.eval", description=__doc__.split("\n")[0])
    parser.add_argument("--model", "--model_name_or_path", dest="models", action="append", required=True,
                        help="a trained output folder (full, merged or LoRA); repeat to compare several")
    parser.add_argument("--data", "--data_path", dest="data", required=True,
                        help="LLaVA-format .json/.jsonl with answers")
    parser.add_argument("--images", "--image_folder", dest="images",
                        help="the images' folder (default: images/ next to the data file)")
    parser.add_argument("--out", help="write the JSON report here")
    parser.add_argument("--limit", type=int, help="score only the first N records")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--max_new_tokens", type=int, default=MAX_NEW_TOKENS)
    parser.add_argument("--device", help="cuda, mps or cpu (default: the best one present)")
    args = parser.parse_args(argv)
    for flag in ("limit", "batch_size", "max_new_tokens"):
        value = getattr(args, flag)
        if value is not None and value < 1:  # a negative --limit slice would drop records silently
            raise UserError(f"--{flag} {value}: expected a positive number")
    if args.out:  # found now, not after the whole evaluation
        check_writable(Path(args.out), "--out")
    items = load_items(args.data, args.images, args.limit)
    reports = [evaluate(load_trained(folder, device=args.device), items, batch_size=args.batch_size,
                        max_new_tokens=args.max_new_tokens) for folder in args.models]
    print(format_table(reports))
    if args.out:
        atomic_write_json(Path(args.out), {"data": args.data, "n": len(items), "models": reports})
        print(f"report written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
