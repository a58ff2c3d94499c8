"""The tiny world's data: coloured shapes on a small canvas, with captions and questions.

A scene is a handful of objects, each a (shape, colour) placed in one cell of a 2x2 grid, so every
object sits unambiguously on the *left* or the *right*. Captions list the objects left to right and
say which side each is on: the contrastive CLIP stage then has a reason to keep position in the patch
features, which is what makes left/right questions learnable later (a first version whose captions never
mentioned sides stayed at chance on left/right).

Everything here is deterministic given a seed. `data_scripts/make_shapes.py` is the CLI around it.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

from course_lib.data.records import IMAGE_TOKEN
from course_lib.util.files import atomic_write_json

SHAPES = ("circle", "square", "triangle")
COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 200, 30)}
SIDES = ("left", "right")
BACKGROUND = (245, 245, 245)
# A question that shows an image asks about it; the `<image>` placeholder follows LLaVA-Instruct's
# habit of putting it at the start of the first human turn (CC3M captions put it at the end).


@dataclass(frozen=True)
class Obj:
    shape: str
    color: str
    cell: int  # 0..3: row-major in the 2x2 grid; columns 0 are left, 1 are right

    @property
    def side(self) -> str:
        return SIDES[self.cell % 2]

    @property
    def name(self) -> str:
        return f"{self.color} {self.shape}"


@dataclass(frozen=True)
class Scene:
    objects: tuple[Obj, ...]


def random_scene(rng: random.Random, max_objects: int = 3) -> Scene:
    n = rng.randint(1, max_objects)
    cells = rng.sample(range(4), n)
    objs = tuple(Obj(rng.choice(SHAPES), rng.choice(list(COLORS)), c) for c in sorted(cells))
    return Scene(objs)


def render(scene: Scene, size: int = 64, rng: random.Random | None = None) -> Image.Image:
    """Draw the scene; `rng` adds a little jitter in position and size so no two images are alike."""
    rng = rng or random.Random(0)
    img = Image.new("RGB", (size, size), BACKGROUND)
    draw = ImageDraw.Draw(img)
    half = size // 2
    for obj in scene.objects:
        col, row = obj.cell % 2, obj.cell // 2
        r = int(half * rng.uniform(0.28, 0.38))
        cx = col * half + half // 2 + rng.randint(-half // 8, half // 8)
        cy = row * half + half // 2 + rng.randint(-half // 8, half // 8)
        box = (cx - r, cy - r, cx + r, cy + r)
        fill = COLORS[obj.color]
        if obj.shape == "circle":
            draw.ellipse(box, fill=fill)
        elif obj.shape == "square":
            draw.rectangle(box, fill=fill)
        else:
            draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    return img


def caption(scene: Scene) -> str:
    """A caption listing the objects left to right, each with its side."""
    parts = []
    for side in SIDES:
        names = [o.name for o in scene.objects if o.side == side]
        if names:
            parts.append(" and ".join(f"a {n}" for n in names) + f" on the {side}")
    return " , ".join(parts) + " ."


def questions(scene: Scene, rng: random.Random) -> list[tuple[str, str, str]]:
    """(question type, question, short answer) pairs, each answerable from the scene alone."""
    qs: list[tuple[str, str, str]] = []
    shape_counts = Counter(o.shape for o in scene.objects)
    name_counts = Counter(o.name for o in scene.objects)
    qs.append(("count", "How many shapes are there?", str(len(scene.objects))))
    shape = rng.choice(SHAPES)
    qs.append(("count", f"How many {shape}s are there?", str(shape_counts[shape])))
    for obj in scene.objects:
        if shape_counts[obj.shape] == 1:
            qs.append(("color", f"What color is the {obj.shape}?", obj.color))
        if sum(o.color == obj.color for o in scene.objects) == 1:
            qs.append(("shape", f"What shape is the {obj.color} object?", obj.shape))
        if name_counts[obj.name] == 1:
            qs.append(("position", f"Is the {obj.name} on the left or the right?", obj.side))
    return qs


def absent_questions(scene: Scene, rng: random.Random) -> list[tuple[str, str, str]]:
    """Questions about objects that are *not* in the scene, answered "there is no ...".

    Image-text mismatch negatives (source 000's remedy for hallucination): the same three question
    shapes as `questions`, about a shape, a colour or an object the image does not show, so that the
    only right answer is to say so.
    """
    shapes = Counter(o.shape for o in scene.objects)
    colors = {o.color for o in scene.objects}
    names = {o.name for o in scene.objects}
    qs = [("color", f"What color is the {s}?", f"there is no {s}") for s in SHAPES if not shapes[s]]
    qs += [("shape", f"What shape is the {c} object?", f"there is no {c} object") for c in COLORS if c not in colors]
    absent = [f"{c} {s}" for c in COLORS for s in SHAPES if f"{c} {s}" not in names]
    name = rng.choice(absent)
    qs.append(("position", f"Is the {name} on the left or the right?", f"there is no {name}"))
    return qs


def write_question_set(out: Path, n: int, seed: int, absent: bool, image_size: int = 64,
                       max_objects: int = 3) -> Path:
    """`n` one-image questions on fresh scenes (seeded apart from the world's): about objects the image
    shows, or (`absent`) about objects it does not. Writes `questions.json` + `images/`; returns the json."""
    rng = random.Random(seed)
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(n):
        scene = random_scene(rng, max_objects)
        sid = f"{'absent' if absent else 'present'}_{i:06d}"
        name = _save(render(scene, image_size, rng), out / "images", f"{sid}.png")
        qtype, q, a = rng.choice(absent_questions(scene, rng) if absent else questions(scene, rng))
        records.append(_record(sid, "eval", qtype, a, name, _conv([(q, a)], 1), (scene,)))
    atomic_write_json(out / "questions.json", records, indent=1)
    return out / "questions.json"


def compare_question(scenes: list[Scene], rng: random.Random) -> tuple[str, str]:
    """The two-image question: which scene has more of a shape (first, second or same).

    The answer shows its work, a one-line chain of thought: both counts, then the verdict
    ("2 vs 1, so first"). Asked for the verdict alone, the tiny models never learnt the question: it
    takes two counts and a comparison in one step, and every run answered one constant class (10 of 35
    right, 28.6%). Each count is the single-image count skill, and the comparison of two
    digits is text the LM learns in pretraining. Scoring stays exact match on the whole answer, so the
    counts must be right as well.
    """
    shape = rng.choice(SHAPES)
    counts = [sum(o.shape == shape for o in s.objects) for s in scenes]
    verdict = "same" if counts[0] == counts[1] else ("first" if counts[0] > counts[1] else "second")
    return f"Which image has more {shape}s: first, second, or same?", f"{counts[0]} vs {counts[1]}, so {verdict}"


def described_chat(rng: random.Random, max_objects: int = 3, compare_fraction: float = 0.2,
                   max_turns: int = 3) -> list[tuple[str, str]]:
    """(user, assistant) turns about a scene *told in words*: the caption stands where the image will be.

    The tiny LM learns from these to answer every image question type from a description at the start
    of the user turn, so stage 2 only has to make the image tokens stand in for that description, as a
    real LLM brings its reading and counting skills to LLaVA.
    """
    if rng.random() < compare_fraction:
        scenes = [random_scene(rng, max_objects) for _ in range(2)]
        q, a = compare_question(scenes, rng)
        return [(f"first: {caption(scenes[0])}\nsecond: {caption(scenes[1])}\n{q}", a)]
    scene = random_scene(rng, max_objects)
    qs = questions(scene, rng)
    turns = rng.sample(qs, min(len(qs), rng.randint(1, max_turns)))
    return [(f"{caption(scene)}\n{turns[0][1]}", turns[0][2])] + [(q, a) for _, q, a in turns[1:]]


# Text-only knowledge the tiny LM learns in pretraining: the "language ability" that LLaVA keeps.
def text_only_qa(rng: random.Random) -> tuple[str, str, str]:
    kind = rng.randrange(3)
    if kind == 0:
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        return "text", f"What is {a} plus {b}?", str(a + b)
    if kind == 1:
        corners = {"triangle": "3", "square": "4", "circle": "0"}
        s = rng.choice(SHAPES)
        return "text", f"How many corners does a {s} have?", corners[s]
    mixes = {("red", "yellow"): "orange", ("blue", "yellow"): "green", ("red", "blue"): "purple"}
    (c1, c2), mixed = rng.choice(list(mixes.items()))
    return "text", f"What color do you get if you mix {c1} and {c2}?", mixed


@dataclass
class WorldSpec:
    seed: int = 0
    image_size: int = 64
    n_pretrain: int = 3000
    n_instruct: int = 6000
    n_eval: int = 300
    max_objects: int = 3
    two_image_fraction: float = 0.15
    text_only_fraction: float = 0.1
    # Questions per training image or text chat (1 to max_turns; the eval asks one). Five, not three:
    # more answers per sequence taught the tiny LM to read a described scene (colour 28% -> 72%).
    max_turns: int = 5


def _conv(turns: list[tuple[str, str]], n_images: int) -> list[dict]:
    conv = []
    for i, (q, a) in enumerate(turns):
        if i == 0 and n_images:
            q = "\n".join([IMAGE_TOKEN] * n_images + [q])
        conv += [{"from": "human", "value": q}, {"from": "gpt", "value": a}]
    return conv


def _record(sid: str, part: str, qtype: str, answer: str, image, conv: list[dict],
            scenes: tuple[Scene, ...] = ()) -> dict:
    """A LLaVA record; the held-out eval part also carries its question type, reference answer and the
    number of objects in each image (`objects`), so accuracy can be broken down by scene size."""
    rec: dict = {"id": sid}
    if image is not None:
        rec["image"] = image
    rec["conversations"] = conv
    if part == "eval":
        rec.update(type=qtype, answer=answer, objects=[len(s.objects) for s in scenes])
    return rec


def _save(img: Image.Image, folder: Path, name: str) -> str:
    img.save(folder / name)
    return name


def write_world(out: Path, spec: WorldSpec) -> dict[str, int]:
    """Write pretrain/ (chat.json + images_dl/), instruct/ and eval/ under `out`. Returns sizes."""
    rng = random.Random(spec.seed)
    out = Path(out)
    sizes = {}

    pre = out / "pretrain"
    (pre / "images_dl").mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(spec.n_pretrain):
        scene = random_scene(rng, spec.max_objects)
        name = _save(render(scene, spec.image_size, rng), pre / "images_dl", f"pre_{i:06d}.png")
        # CC3M-Pretrain puts <image> after the instruction; we keep that shape.
        records.append({"id": f"pre_{i:06d}", "image": name, "conversations": [
            {"from": "human", "value": f"Give a brief description of the image.\n{IMAGE_TOKEN}"},
            {"from": "gpt", "value": caption(scene)}]})
    atomic_write_json(pre / "chat.json", records, indent=1)
    sizes["pretrain"] = len(records)

    for part, n in (("instruct", spec.n_instruct), ("eval", spec.n_eval)):
        folder = out / part
        (folder / "images").mkdir(parents=True, exist_ok=True)
        records = []
        for i in range(n):
            sid = f"{part}_{i:06d}"
            r = rng.random()
            if r < spec.text_only_fraction:
                qtype, q, a = text_only_qa(rng)
                records.append(_record(sid, part, qtype, a, None, _conv([(q, a)], 0)))
            elif r < spec.text_only_fraction + spec.two_image_fraction:
                scenes = [random_scene(rng, spec.max_objects) for _ in range(2)]
                q, a = compare_question(scenes, rng)
                names = [_save(render(s, spec.image_size, rng), folder / "images", f"{sid}_{k}.png")
                         for k, s in enumerate(scenes)]
                records.append(_record(sid, part, "compare", a, names, _conv([(q, a)], 2), tuple(scenes)))
            else:
                scene = random_scene(rng, spec.max_objects)
                name = _save(render(scene, spec.image_size, rng), folder / "images", f"{sid}.png")
                qs = questions(scene, rng)
                turns = rng.sample(qs, min(len(qs), 1 if part == "eval" else rng.randint(1, spec.max_turns)))
                conv = _conv([(q, a) for _, q, a in turns], 1)
                records.append(_record(sid, part, turns[0][0], turns[0][2], name, conv, (scene,)))
        atomic_write_json(folder / f"{part}.json", records, indent=1)
        sizes[part] = len(records)
    return sizes


def world_texts(spec: WorldSpec, n: int = 4000) -> list[str]:
    """Texts of the world for training the tokenizer, laid out as the chat template lays them out.

    An answer starts the assistant turn, right after a newline, so it is written here at the start of
    a line: without that, the BPE only ever saw " circle" (with its space) and the answers split into
    rare pieces (`circle` -> c|ir|cle, `second` -> s|e|c|o|n|d), which the tiny LM learnt badly.
    """
    rng = random.Random(spec.seed + 1)
    texts = []
    for _ in range(n):
        texts.append(caption(random_scene(rng, spec.max_objects)))
        texts.extend(f"{q}\n{a}" for q, a in described_chat(rng, spec.max_objects))
        texts.append("\n".join(text_only_qa(rng)[1:]))
    return texts
