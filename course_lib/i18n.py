"""The course in other languages: `notebooks/<lang>/` is generated from the English notebooks and a translation file
per notebook, so the code has one source and a drifting translation is a test failure.

    python -m course_lib.i18n --lang zh            # write notebooks/zh/ and report what is missing or stale
    python -m course_lib.i18n --lang zh --check    # write nothing; exit 1 if notebooks/zh/ is out of date
    python -m course_lib.i18n --lang zh --stub     # add an empty entry for every untranslated cell

`notebooks/i18n/zh/05_finetune.yml` maps each Markdown cell id of `notebooks/05_finetune.ipynb` to its Chinese
text and to `en_sha`, a hash of the English text it translates. When the English cell changes, its hash no longer
matches and the translation is reported stale until someone updates the text and the hash. Code cells are never
translated: the generator copies them, source, tags and all, from the English notebook. So the Chinese notebooks
need no second run in `make test`; `tests/test_i18n.py` proves their code is the English code byte for byte.

Beyond missing and stale cells, the report names two mistakes a translator makes by hand:
- a number that differs from the English cell's (the numbers of a measured run must survive translation);
- a term the language's glossary (`notebooks/i18n/<lang>/glossary.yml`) says to avoid.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from course_lib.util.cli import Parser, UserError, command

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = REPO / "notebooks"
LANGS = ("zh",)
# The banner's bold keys, per language; `lessons.recap.banner` reads either.
BANNER_KEYS = {"zh": {"Needs": "需要", "Builds": "产出", "Takes": "耗时", "Words": "术语"}}
NUMBER = re.compile(r"(?<![A-Za-z0-9_.])\d(?:[\d,]*\d)?(?:\.\d+)?")  # "3e-5," is 3 and 5, not "5,"
LINK = re.compile(r"\]\(([^)\s]+)\)")


def english_notebooks(root: Path = NOTEBOOKS) -> list[Path]:
    """The English notebooks a language edition mirrors: the lessons and their solutions."""
    return sorted(root.glob("*.ipynb")) + sorted((root / "solutions").glob("*.ipynb"))


def relative(notebook: Path, root: Path = NOTEBOOKS) -> Path:
    return notebook.relative_to(root)


def translation_file(lang: str, notebook: Path, root: Path = NOTEBOOKS) -> Path:
    return (root / "i18n" / lang / relative(notebook, root)).with_suffix(".yml")


def en_sha(text: str) -> str:
    """The hash stored beside a translation: the first 12 hex digits of the English text's sha256."""
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def cell_text(cell: dict) -> str:
    source = cell["source"]
    return source if isinstance(source, str) else "".join(source)


def numbers(text: str) -> set[str]:
    """The numbers a text states, with thousands separators dropped: {'97.0', '151936', ...}. Single digits are
    left out: Chinese writes "stage 1" as 第一阶段 and "two ranks" as 两个进程, while a measured number has a
    decimal point or more digits."""
    return {n for n in (m.replace(",", "") for m in NUMBER.findall(text)) if len(n) > 1}


def glossary(lang: str, root: Path = NOTEBOOKS) -> list[dict]:
    path = root / "i18n" / lang / "glossary.yml"
    return yaml.safe_load(path.read_text(encoding="utf-8")) if path.is_file() else []


def read_translations(path: Path) -> dict[str, dict]:
    if not path.is_file():
        return {}
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        raise UserError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(data, dict) or not all(isinstance(v, dict) and "en_sha" in v for v in data.values()):
        raise UserError(f"{path}: expected `cell_id: {{en_sha: ..., text: ...}}` entries")
    return data


class _Block(yaml.SafeDumper):
    """Multi-line text as `|` blocks, so a translation file reads (and diffs) like the text it holds."""


_Block.add_representer(str, lambda dumper, s: dumper.represent_scalar(
    "tag:yaml.org,2002:str", s, style="|" if "\n" in s else None))


def write_translations(path: Path, notebook: Path, entries: dict[str, dict], root: Path = NOTEBOOKS) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    head = (f"# Translations of the Markdown cells of notebooks/{relative(notebook, root).as_posix()}, by cell id.\n"
            "# en_sha: sha256[:12] of the English text translated; regenerate with python -m course_lib.i18n\n")
    path.write_text(head + yaml.dump(entries, Dumper=_Block, allow_unicode=True, sort_keys=False, width=10**6),
                    encoding="utf-8")


@dataclass
class Edition:
    """One generated notebook and what its translation lacks."""

    notebook: dict
    missing: list[str] = field(default_factory=list)  # cell ids with no translation
    stale: list[str] = field(default_factory=list)  # cell ids whose English changed since translation
    problems: list[str] = field(default_factory=list)  # numbers, glossary, unknown ids


def translate(english: dict, translations: dict[str, dict], lang: str, source_name: str,
              terms: list[dict] = ()) -> Edition:
    """The `lang` edition of one English notebook: Markdown from `translations`, everything else copied.

    An untranslated cell keeps its English text and a stale one its old translation, so the edition is
    always whole; the caller reports both.
    """
    edition = Edition(copy.deepcopy(english))
    edition.notebook["metadata"]["course_lib"] = {"lang": lang, "generated_from": source_name}
    ids = set()
    for cell in edition.notebook["cells"]:
        ids.add(cell.get("id"))
        if cell["cell_type"] != "markdown":
            continue
        english_text = cell_text(cell)
        entry = translations.get(cell.get("id")) or {}
        text = entry.get("text")
        if not text:
            edition.missing.append(cell["id"])
            continue
        if entry["en_sha"] != en_sha(english_text):
            edition.stale.append(cell["id"])
        else:  # a stale cell's numbers may differ until it is retranslated
            ours, theirs = numbers(text), numbers(english_text)
            if ours != theirs:
                extra, lost = sorted(ours - theirs), sorted(theirs - ours)
                edition.problems.append(f"cell {cell['id']}: numbers differ from the English"
                                        + (f"; not in the English: {', '.join(extra)}" if extra else "")
                                        + (f"; missing: {', '.join(lost)}" if lost else ""))
        for term in terms:
            for avoid in term.get("avoid", ()):
                if avoid in text:
                    edition.problems.append(f"cell {cell['id']}: '{avoid}' for {term['en']}: the glossary says "
                                            f"'{term[lang]}'")
        cell["source"] = text.splitlines(keepends=True)
    unknown = sorted(set(translations) - ids)
    if unknown:
        edition.problems.append(f"translations for cells the English notebook no longer has: {', '.join(unknown)}")
    return edition


def dumps(notebook: dict) -> str:
    """A notebook as the course stores them (the same layout as the English files)."""
    return json.dumps(notebook, indent=1, ensure_ascii=False) + "\n"


def editions(lang: str, root: Path = NOTEBOOKS) -> dict[Path, Edition]:
    """Every `lang` notebook, by its path under `root / lang`."""
    if lang not in LANGS:
        raise UserError(f"--lang {lang}: expected one of {', '.join(LANGS)}")
    terms = glossary(lang, root)
    out = {}
    for notebook in english_notebooks(root):
        target = root / lang / relative(notebook, root)
        source_name = Path(os.path.relpath(notebook, target.parent)).as_posix()
        english = json.loads(notebook.read_text(encoding="utf-8"))
        out[target] = translate(english, read_translations(translation_file(lang, notebook, root)), lang,
                                source_name, terms)
    return out


def report(lang: str, root: Path = NOTEBOOKS, *, write: bool = False, only: tuple[str, ...] = ()) -> list[str]:
    """One line per thing to fix: missing or stale cells, wrong numbers, glossary slips, broken links, out-of-date
    files. With `write`, the edition is written first, so only the translation work is left in the report.
    `only` keeps the notebooks whose path under `root / lang` starts with one of its prefixes ("05", "solutions/05").
    """
    lines = []
    built = editions(lang, root)
    for target, edition in built.items():
        name = relative(target, root).as_posix()
        if only and not relative(target, root / lang).as_posix().startswith(only):
            continue
        text = dumps(edition.notebook)
        if not target.is_file() or target.read_text(encoding="utf-8") != text:
            if write:
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_text(text, encoding="utf-8")
            else:
                lines.append(f"{name}: not what the generator writes (run python -m course_lib.i18n --lang {lang})")
        if edition.missing:
            lines.append(f"{name}: {len(edition.missing)} Markdown cells not translated: {', '.join(edition.missing)}")
        if edition.stale:
            lines.append(f"{name}: English changed since translation (update the text and en_sha): "
                         f"{', '.join(edition.stale)}")
        lines += [f"{name}: {p}" for p in edition.problems]
        if target.is_file():
            lines += [f"{name}: {b}" for b in broken_links(target)]
    for extra in sorted(set((root / lang).rglob("*.ipynb")) - set(built)):
        lines.append(f"{relative(extra, root).as_posix()}: no English notebook of that name")
    return lines


def stub(lang: str, root: Path = NOTEBOOKS) -> int:
    """Add `{en_sha, text: null}` for every untranslated Markdown cell; returns how many were added."""
    added = 0
    for notebook in english_notebooks(root):
        path = translation_file(lang, notebook, root)
        entries = read_translations(path)
        cells = json.loads(notebook.read_text(encoding="utf-8"))["cells"]
        for cell in cells:
            if cell["cell_type"] == "markdown" and cell["id"] not in entries:
                entries[cell["id"]] = {"en_sha": en_sha(cell_text(cell)), "text": None}
                added += 1
        order = [c["id"] for c in cells]  # the notebook's order, so a file reads top to bottom
        entries = dict(sorted(entries.items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else len(order)))
        write_translations(path, notebook, entries, root)
    return added


def heading_ids(notebook: dict) -> set[str]:
    """The anchors JupyterLab gives a notebook's headings: the heading's text with spaces as dashes."""
    ids = set()
    for cell in notebook["cells"]:
        if cell["cell_type"] == "markdown":
            for line in cell_text(cell).splitlines():
                if re.match(r"#{1,6} ", line):
                    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", line.lstrip("#").strip())
                    ids.add(re.sub(r"[`*]", "", text).replace(" ", "-"))
    return ids


def broken_links(notebook: Path) -> list[str]:
    """The relative links in a notebook's Markdown whose file, or heading in a linked notebook, is not there."""
    cells = json.loads(notebook.read_text(encoding="utf-8"))["cells"]
    bad, headings = [], {}  # headings: each linked notebook's anchors, read once however often it is linked
    for cell in cells:
        if cell["cell_type"] != "markdown":
            continue
        for target in LINK.findall(cell_text(cell)):
            if re.match(r"[a-z]+:", target):
                continue  # http(s), mailto: not checked offline
            path, _, anchor = target.partition("#")
            file = (notebook.parent / path).resolve() if path else notebook
            if not file.exists():
                bad.append(f"cell {cell['id']}: {target}: no such file")
            elif anchor and file.suffix == ".ipynb":
                if file not in headings:
                    headings[file] = heading_ids(json.loads(file.read_text(encoding="utf-8")))
                if anchor not in headings[file]:
                    bad.append(f"cell {cell['id']}: {target}: no heading '{anchor}' in {file.name}")
    return bad


def notebook_lang(cwd: Path | None = None) -> str:
    """The language of the notebook running now: its folder's name (`notebooks/zh/` -> "zh"), else "en".

    Jupyter starts a notebook's kernel in the notebook's folder, so the same code cell, copied byte for byte
    into every edition, can still show the reader's language.
    """
    folder = (cwd or Path.cwd()).resolve()
    for edition in (folder, folder.parent):  # notebooks/zh/ and notebooks/zh/solutions/
        if edition.name in LANGS and edition.parent.name == "notebooks":
            return edition.name
    return "en"


@command
def main(argv: list[str] | None = None) -> int:
    parser = Parser(prog="python -m course_lib.i18n", description=__doc__.split("\n\n")[0])
    parser.add_argument("--lang", default="zh", help=f"one of {', '.join(LANGS)}")
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 if anything is to fix")
    parser.add_argument("--stub", action="store_true", help="add empty entries for untranslated cells first")
    parser.add_argument("--only", action="extend", nargs="+", default=[], metavar="PREFIX",
                        help="report only these notebooks: 05, solutions/05 (repeatable); all are still written")
    args = parser.parse_args(argv)
    if args.stub:
        print(f"{stub(args.lang)} empty entries added under notebooks/i18n/{args.lang}/")
    lines = report(args.lang, write=not args.check, only=tuple(args.only))
    print("\n".join(lines) if lines else f"notebooks/{args.lang}/ is complete and up to date")
    return 1 if lines and args.check else 0


if __name__ == "__main__":
    sys.exit(main())
