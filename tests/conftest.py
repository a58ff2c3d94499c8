"""Shared fixtures: the tiny world is built once (cached under $COURSE_LIB_HOME) and reused."""

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
