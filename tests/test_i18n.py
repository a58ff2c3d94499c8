"""The Chinese edition (notebooks/zh/) stays in step with the English notebooks it is generated from."""

import json
import shutil
from pathlib import Path

import pytest

from course_lib.i18n import (
    BANNER_KEYS,
    LANGS,
    LINK,
    NOTEBOOKS,
    broken_links,
    cell_text,
    en_sha,
    english_notebooks,
    notebook_lang,
    numbers,
    read_translations,
    relative,
    report,
    translation_file,
    write_translations,
)
from course_lib.lessons.recap import banner


def cells(path: Path) -> list[dict]:
    return json.loads(path.read_text(encoding="utf-8"))["cells"]


@pytest.mark.parametrize("lang", LANGS)
def test_the_edition_is_what_the_generator_writes_whole_and_up_to_date(lang):
    assert report(lang) == []  # every line names a cell to translate, a stale one, a number or a word to fix


@pytest.mark.parametrize("lang", LANGS)
def test_the_editions_code_is_the_english_code_byte_for_byte(lang):
    """What lets `make test` skip executing notebooks/zh/: only Markdown differs from the English notebook."""
    for english in english_notebooks():
        ours, theirs = cells(NOTEBOOKS / lang / relative(english)), cells(english)
        assert [c["id"] for c in ours] == [c["id"] for c in theirs], english.name
        for a, b in zip(ours, theirs):
            if b["cell_type"] == "markdown":
                assert a["cell_type"] == "markdown" and a["source"] != b["source"], (english.name, b["id"])
            else:
                assert a == b, (english.name, b["id"])


@pytest.mark.parametrize("notebook", english_notebooks() + [NOTEBOOKS / lang / relative(p) for lang in LANGS
                                                            for p in english_notebooks()],
                         ids=lambda p: p.relative_to(NOTEBOOKS).as_posix())
def test_links_lead_to_a_file_and_heading_that_exist(notebook):
    assert broken_links(notebook) == []


@pytest.mark.parametrize("lang", LANGS)
def test_every_banner_has_the_english_banners_keys(lang):
    for english in sorted(NOTEBOOKS.glob("*.ipynb")):
        assert banner(NOTEBOOKS / lang / english.name).keys() == banner(english).keys(), english.name
    assert set(BANNER_KEYS[lang]) == {"Needs", "Builds", "Takes", "Words"}


@pytest.fixture
def course_copy(tmp_path) -> Path:
    """A copy of notebooks/ (both editions and the translations) to break on purpose."""
    root = tmp_path / "notebooks"
    shutil.copytree(NOTEBOOKS, root, ignore=shutil.ignore_patterns(".ipynb_checkpoints"))
    return root


def test_a_change_to_english_code_or_prose_fails_until_regenerated_and_retranslated(course_copy):
    """Demonstrations on a copy of the course: the check catches both kinds of drift, and the generator fixes one."""
    root = course_copy
    english = root / "05_finetune.ipynb"
    assert report("zh", root) == []

    nb = json.loads(english.read_text(encoding="utf-8"))
    code = next(c for c in nb["cells"] if c["cell_type"] == "code")
    code["source"] = ["print('a new line of code')\n"] + code["source"]
    english.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    assert report("zh", root) == ["zh/05_finetune.ipynb: not what the generator writes "
                                  "(run python -m course_lib.i18n --lang zh)"]
    assert report("zh", root, write=True) == []  # code needs no translator: regenerating is the whole fix
    assert cells(root / "zh" / "05_finetune.ipynb")[1]["source"][0] == "print('a new line of code')\n"

    prose = next(c for c in nb["cells"] if c["cell_type"] == "markdown" and c["id"] != nb["cells"][0]["id"])
    prose["source"] = prose["source"] + ["\nA new sentence the Chinese edition does not have yet.\n"]
    english.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    stale = f"zh/05_finetune.ipynb: English changed since translation (update the text and en_sha): {prose['id']}"
    assert stale in report("zh", root, write=True)  # regenerating does not hide it
    assert stale in report("zh", root)

    path = translation_file("zh", english, root)
    entries = read_translations(path)
    entries[prose["id"]] = {"en_sha": en_sha(cell_text(prose)),
                            "text": entries[prose["id"]]["text"] + "\n英文版新加的一句话，这里是它的译文。\n"}
    write_translations(path, english, entries, root)
    assert report("zh", root, write=True) == []


def test_a_translation_that_loses_a_number_or_uses_an_avoided_word_is_reported(course_copy):
    root = course_copy
    english = root / "06_compare_train_types.ipynb"
    path = translation_file("zh", english, root)
    entries = read_translations(path)
    cell_id, entry, measured = next((k, v, n) for k, v in entries.items() for n in numbers(v["text"]) if "." in n)
    wrong = measured + "9"  # 820.6 -> 820.69: a slip of the keyboard
    entries[cell_id] = {**entry, "text": entry["text"].replace(measured, wrong, 1) + "\n视觉塔\n"}
    write_translations(path, english, entries, root)
    problems = report("zh", root, write=True)
    assert any(f"cell {cell_id}: numbers differ from the English; not in the English: {wrong}; missing: {measured}"
               in p for p in problems)
    assert any(f"cell {cell_id}: '视觉塔' for vision tower" in p for p in problems)


def test_a_notebook_knows_its_edition_from_its_folder(tmp_path):
    assert notebook_lang(NOTEBOOKS) == "en"
    assert notebook_lang(NOTEBOOKS / "zh") == "zh"
    assert notebook_lang(NOTEBOOKS / "zh" / "solutions") == "zh"
    assert notebook_lang(tmp_path / "zh") == "en"  # a folder named zh elsewhere is not an edition


def test_the_readmes_chinese_part_states_the_numbers_of_the_english_part():
    """The Chinese part quotes the same runs: every number it states is one the English part states."""
    english, chinese = (NOTEBOOKS.parent / "README.md").read_text(encoding="utf-8").split("\n## 简体中文\n")
    assert numbers(chinese) - numbers(english) == set()
    assert "](notebooks/zh/)" in chinese
    files = [t for t in LINK.findall(chinese) if not t.startswith(("#", "http"))]
    assert [t for t in files if not (NOTEBOOKS.parent / t).exists()] == []
