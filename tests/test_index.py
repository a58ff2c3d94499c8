"""The data index (course_lib/data/index.py): lengths measured once per data file and settings, read back by
every later dataset, rebuilt when the file or a setting changes, and never left half-written."""

import json

import datasets
import pytest

from course_lib.data import index
from course_lib.data.dataset import LlavaDataset
from course_lib.data.labels import PromptEncoder
from course_lib.data.records import to_sample


@pytest.fixture
def small_set(tiny_world, tmp_path, monkeypatch):
    """200 instruct records in a file of their own, and an empty index cache."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    records = json.loads((tiny_world.data / "instruct" / "instruct.json").read_text())[:200]
    data = tmp_path / "small.json"
    data.write_text(json.dumps(records))
    return data, records, tiny_world.data / "instruct" / "images"


def _lengths_by_hand(records, processor, max_length):
    encoder = PromptEncoder(processor, "chat")
    encoded = [encoder.truncate(encoder.encode(to_sample(r, i)), max_length) for i, r in enumerate(records)]
    return [len(e.input_ids) for e in encoded if e is not None]


def test_lengths_are_measured_once_then_read_from_the_index(small_set, processor, monkeypatch):
    data, records, images = small_set
    first = LlavaDataset(data, processor, image_folder=images, template="chat")
    assert first.lengths == _lengths_by_hand(records, processor, 2048)
    assert [len(first[k]["input_ids"]) for k in (0, 57, 199)] == [first.lengths[k] for k in (0, 57, 199)]

    def measured(*_):
        raise AssertionError("measured again instead of reading the index")

    monkeypatch.setattr(index.Measure, "__call__", measured)
    again = LlavaDataset(data, processor, image_folder=images, template="chat")
    assert again.lengths == first.lengths and again.image_counts == first.image_counts
    assert [s.id for s in again.samples] == [r["id"] for r in records]
    with pytest.raises(AssertionError, match="measured again"):  # a setting the lengths depend on: measured anew
        LlavaDataset(data, processor, image_folder=images, template="chat", model_max_length=48)


def test_a_changed_file_or_setting_gets_its_own_index(small_set, processor):
    data, records, images = small_set
    LlavaDataset(data, processor, image_folder=images, template="chat")
    short = LlavaDataset(data, processor, image_folder=images, template="chat", model_max_length=28)
    assert short.lengths == _lengths_by_hand(records, processor, 28) and short.stats["dropped_too_long"] > 0
    folders = list(index.cache_root().iterdir())
    assert len(folders) == 1 and len(list(folders[0].glob("lengths-*.arrow"))) == 2
    data.write_text(json.dumps(records[:150]))  # the file changes: its records are indexed again
    assert len(LlavaDataset(data, processor, image_folder=images, template="chat")) == 150
    assert len(list(index.cache_root().iterdir())) == 2


def test_a_crash_while_indexing_leaves_no_index_behind(small_set, processor, monkeypatch):
    data, records, images = small_set
    rows = index._rows

    def crashing(records):
        for k, row in enumerate(rows(records)):
            if k == 100:
                raise KeyboardInterrupt  # as if the job were stopped half-way
            yield row

    monkeypatch.setattr(index, "BATCH_ROWS", 40)  # some batches are already on disk when it stops
    monkeypatch.setattr(index, "_rows", crashing)
    with pytest.raises(KeyboardInterrupt):
        LlavaDataset(data, processor, image_folder=images, template="chat")
    assert not list(index.cache_root().glob("*/records.arrow"))
    monkeypatch.setattr(index, "_rows", rows)
    assert len(LlavaDataset(data, processor, image_folder=images, template="chat")) == 200
