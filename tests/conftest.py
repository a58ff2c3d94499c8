"""Shared fixtures: the tiny world is built once (cached under $COURSE_LIB_HOME) and reused; the
notebooks that nbmake collects get the `notebook` marker (the lanes are listed in pyproject.toml)."""

import os

import pytest

# Tests never reach a hub: these machines have no internet, and CI must not depend on one.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")


@pytest.fixture(scope="session")
def tiny_world():
    from course_lib.world import ensure_tiny_world

    return ensure_tiny_world()


@pytest.fixture(scope="session")
def empty_llava(tiny_world, tmp_path_factory):
    """An empty LLaVA built from the tiny backbones and saved: (folder, model, processor)."""
    from course_lib.build import build_llava

    out = tmp_path_factory.mktemp("empty_llava")
    model, processor = build_llava(str(tiny_world.clip), str(tiny_world.llm), out)
    return out, model, processor


def pytest_collection_modifyitems(config, items):
    """nbmake's items (one per notebook) carry no marker of their own: mark them, so `-m "not notebook"`
    deselects them. Applies when tests/ is collected too (`make test` collects tests and notebooks)."""
    for item in items:
        if item.path.suffix == ".ipynb":
            item.add_marker(pytest.mark.notebook)


@pytest.fixture(scope="session")
def processor(empty_llava):
    """The empty LLaVA's LlavaProcessor (tokenizer with `<image>`, CLIP image processor)."""
    return empty_llava[2]


@pytest.fixture(scope="module")
def loaded(empty_llava):
    """The empty LLaVA through the serving loader. Module scope: tests monkeypatch its model, and each
    module gets its own."""
    from course_lib.serving.loading import load_trained

    return load_trained(empty_llava[0], device="cpu")


@pytest.fixture(scope="session")
def eval_pngs(tiny_world):
    """The first three images of the tiny world's eval set, in name order."""
    return sorted((tiny_world.data / "eval" / "images").glob("*.png"))[:3]
