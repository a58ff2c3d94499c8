"""Claims from the course's sources, tested on the tiny world (notebooks 04, 06 and 09; `benchmarks.lessons`).

Each experiment is one `ablation_run`: a stage-2 run in this process (as `design.projector_run`) from the
empty LLaVA or from a trained folder, changed in one way, then scored on the held-out questions, on the
same questions with black images (the *blind* score: what the question alone gives), and on probe sets:

- **feature layer** (LLaVA-1.5 takes CLIP's layer -2; InternVL takes -4 of its deeper ViT): `feature_layer`.
- **a projector never trained** (source 001: LoRA with the projector initialised but frozen "still worked
  well"): `freeze_projector`, from the empty LLaVA.
- **hallucination** (source 000: answers about things the image does not show; its remedy, image-text
  mismatch data): probes about absent objects (`scenes.write_question_set(absent=True)`), before and after
  adding such questions, answered "there is no ...", to the training data (`extra`).
- **overfitting** (source 000 saw it in epoch 2): a small training subset (`train_limit`) and the
  validation loss every `validate_every` steps.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch.utils.data import ConcatDataset

from course_lib.build import build_llava
from course_lib.data.dataset import LlavaDataset
from course_lib.data.labels import IGNORE_INDEX
from course_lib.lessons.design import answer_accuracy, eval_loss, held_out_batches, tiny_sets, train_steps
from course_lib.model.lora import PROJECTOR
from course_lib.training.trainable import prepare_model
from course_lib.world.scenes import COLORS, SHAPES, SIDES

if TYPE_CHECKING:
    from course_lib.world.backbones import TinyWorld

# A first answer word that names one of these answers as if the asked-about object were there.
CONTENT_WORDS = (*COLORS, *SHAPES, *SIDES)


def first_answer_tokens(model, dataset: LlavaDataset, batch_size: int = 32) -> list[int]:
    """The model's greedy first answer token for every sample (teacher-forced: the token greedy decoding
    would write first)."""
    tokens = []
    model.eval()
    with torch.no_grad():
        for _, batch in held_out_batches(dataset, batch_size):
            logits = model(**batch).logits[:, :-1]
            labels = batch["labels"][:, 1:]
            first = (labels != IGNORE_INDEX).int().argmax(1)  # the first answer position of each row
            tokens += logits[torch.arange(len(first)), first].argmax(-1).tolist()
    return tokens


def probe(model, path: Path, processor) -> dict:
    """Exact match on a question set, and how often the first answer token starts a colour, shape or side
    (an answer about the object as if it were there) or starts the set's own answers ("there is no ...")."""
    dataset = LlavaDataset(path, processor, template="chat")
    records = json.loads(Path(path).read_text())
    tokenizer = processor.tokenizer

    def first(text: str) -> int:  # answers start a line: the tokenizer's pieces for a word at a line start
        return tokenizer(text, add_special_tokens=False)["input_ids"][0]

    content = {first(w) for w in CONTENT_WORDS}
    refusal = {first(r["answer"]) for r in records}
    tokens = first_answer_tokens(model, dataset)
    return {**answer_accuracy(model, dataset, {r["id"]: r["type"] for r in records}),
            "names_an_object_answer": sum(t in content and t not in refusal for t in tokens) / len(tokens),
            "starts_the_reference": sum(t in refusal for t in tokens) / len(tokens),
            "first_words": [tokenizer.decode([t]) for t in tokens[:8]]}


def ablation_run(world: TinyWorld, label: str, *, start: str | Path | None = None, train_type: str = "freeze_vision",
                 steps: int = 300, batch_size: int = 16, lr: float = 5e-4, projector_lr: float = 1e-3,
                 seed: int = 0, feature_layer: int = -2, freeze_projector: bool = False,
                 extra: Path | None = None, train_limit: int | None = None, validate_every: int = 0,
                 probes: dict[str, Path] | None = None, blind: bool = True) -> dict:
    """One stage-2 run in this process, changed as the arguments say; scores, blind scores, probes, curves."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    if start is None:
        model, processor = build_llava(str(world.clip), str(world.llm), seed=seed)
    else:
        model = LlavaForConditionalGeneration.from_pretrained(start, dtype=torch.float32)
        processor = AutoProcessor.from_pretrained(start)
    model.config.vision_feature_layer = feature_layer
    torch.manual_seed(seed)  # LoRA's random init
    model = prepare_model(model, "finetune", train_type)
    if freeze_projector:  # source 001's accident: the projector keeps its random initialisation
        for name, p in model.named_parameters():
            if PROJECTOR in name:
                p.requires_grad = False
    model.config.use_cache = False
    train, evalset, types = tiny_sets(world, processor)
    with tempfile.TemporaryDirectory() as tmp:
        if train_limit:  # the first `train_limit` records of the instruct set, as a data file of their own
            records = json.loads((world.data / "instruct" / "instruct.json").read_text())[:train_limit]
            (Path(tmp) / "subset.json").write_text(json.dumps(records))
            train = LlavaDataset(Path(tmp) / "subset.json", processor, template="chat",
                                 image_folder=world.data / "instruct" / "images")
        data = ConcatDataset([train, LlavaDataset(extra, processor, template="chat")]) if extra else train
        run = train_steps(model, data, processor.tokenizer.pad_token_id, steps, batch_size, lr, projector_lr, seed,
                          validate=(lambda: eval_loss(model, evalset)) if validate_every else None,
                          every=validate_every)
    result = {"label": label, "train_type": train_type, "feature_layer": feature_layer,
              "freeze_projector": freeze_projector, "steps": steps, "batch_size": batch_size,
              "train_samples": len(data), "step_seconds": run["step_seconds"], "losses": run["losses"],
              "validation": run["validation"], **answer_accuracy(model, evalset, types)}
    if blind:
        result["blind"] = answer_accuracy(model, evalset, types, blank_images=True)["accuracy"]
    for name, path in (probes or {}).items():
        result[name] = probe(model, path, processor)
    return result


def seeing_and_blind(folder: str | Path, world: TinyWorld) -> dict:
    """A trained folder's held-out exact match with the images, and blind (black images), per type."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(folder, dtype=torch.float32)
    _, evalset, types = tiny_sets(world, AutoProcessor.from_pretrained(folder))
    seeing, blind = (answer_accuracy(model, evalset, types, blank_images=b) for b in (False, True))
    return {"accuracy": seeing["accuracy"], "blind": blind["accuracy"], "by_type": seeing["by_type"],
            "blind_by_type": blind["by_type"], "n": seeing["n"]}


def plain_captions(folder: str | Path, images: list, max_new_tokens: int = 24) -> list[str]:
    """What a model writes after the image tokens alone: the stage-1 (plain template) prompt, greedy."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(folder)
    texts = []
    with torch.no_grad():
        for image in images:
            inputs = processor(text=processor.image_token, images=image, return_tensors="pt")
            out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, temperature=None,
                                 top_p=None, top_k=None, repetition_penalty=None)
            texts.append(processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
    return texts


RECORDED = Path(__file__).resolve().parents[2] / "benchmarks" / "recorded" / "lessons.json"


def recorded(name: str, path: Path = RECORDED) -> dict:
    """One experiment of `python -m benchmarks.lessons`, as recorded: command, date, world and runs."""
    if not path.exists():
        raise FileNotFoundError(f"{path}: no recorded results; run `python -m benchmarks.lessons --only {name}`")
    results = json.loads(path.read_text())
    if name not in results:
        raise KeyError(f"{path} has no {name!r}; run `python -m benchmarks.lessons --only {name}`")
    return results[name]


def format_recorded(name: str, path: Path = RECORDED) -> str:
    """A markdown table of a recorded experiment, with the command and date that made it."""
    from course_lib.util.tables import render_table

    rec = recorded(name, path)
    runs = rec["runs"]
    types = sorted(runs[0]["by_type"])
    probes = [k for k in runs[0] if isinstance(runs[0][k], dict) and "names_an_object_answer" in runs[0][k]]
    header = ["run", "steps", "held-out accuracy", *(["blind"] if "blind" in runs[0] else []), *types,
              *(f"{p}: answers 'there is no'" for p in probes), *(f"{p}: names a colour/shape/side" for p in probes)]
    body = [[r["label"], str(r["steps"]), f"{r['accuracy']:.1%}", *([f"{r['blind']:.1%}"] if "blind" in r else []),
             *(f"{r['by_type'][t]:.0%}" for t in types), *(f"{r[p]['accuracy']:.1%}" for p in probes),
             *(f"{r[p]['names_an_object_answer']:.1%}" for p in probes)] for r in runs]
    return (f"Recorded by `{rec['command']}` on {rec['date']} (tiny world `{rec['world']}`; batches of "
            f"{runs[0]['batch_size']}, one process):\n\n" + render_table(header, body, markdown=True))
