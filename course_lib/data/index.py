"""The data index: every record's text and token length in Arrow files that all ranks memory-map.

LLaVA-1.5's instruct mix has 665k records in a 1 GB JSON file. Parsing it and tokenizing every record up
front, in every rank, on every launch, costs minutes and gigabytes per rank. So the first process that
needs a data file writes, once, under `datasets`' cache ($HF_DATASETS_CACHE/course_lib_index/):

1. `records.arrow`: one row per record, normalised (`id`, `images`, `roles`, `contents`), or the reason
   it is malformed (`error`, `message`). Its key is the data file's path, size and modification time.
2. `lengths-<key>.arrow`: a cached `datasets.Dataset.map` adding each row's token length, image count,
   tiles and truncation, or why it is dropped. Its key adds everything the lengths depend on: the
   tokenizer and its chat template, the template, `model_max_length`, the image geometry, tiling and
   padding, and the image folder.

Every later process (each rank, each launch) memory-maps both files: the operating system keeps one copy
of their pages for all ranks, and a process holds only the columns it reads (lengths, image counts).
A file lock makes one process build while the others wait. Files are written whole, then renamed into place.

Hugging Face's example scripts do the same with `Dataset.map` under `main_process_first` (run_clm.py).
haotian-liu/LLaVA instead estimates lengths from word counts (`LazySupervisedDataset.modality_lengths`); here
they are exact, because packing and the too-long check need the real token counts.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

from course_lib.data.records import DataError, Sample, locate_data, read_records, record_id, to_sample

INDEX_VERSION = "1"  # bump when a column or the meaning of one changes
BATCH_ROWS = 10_000
PARALLEL_FROM = 20_000  # records; smaller files index faster in one process than by forking workers


def cache_root() -> Path:
    import datasets

    return Path(datasets.config.HF_DATASETS_CACHE) / "course_lib_index"


def digest(*parts: object) -> str:
    return hashlib.sha256("\x1f".join(map(str, parts)).encode()).hexdigest()[:16]


def records_key(data_file: Path) -> str:
    stat = data_file.stat()
    return digest(INDEX_VERSION, data_file.resolve(), stat.st_size, stat.st_mtime_ns, stat.st_ino)


def _locked(folder: Path):
    from course_lib.util.files import exclusive_lock

    return exclusive_lock(folder / "build.lock", "the data index ($HF_DATASETS_CACHE)")


def _rows(records: list) -> Iterator[dict]:
    for index, record in enumerate(records):
        try:
            sample = to_sample(record, index)
        except DataError as err:
            yield {"id": record_id(record, index), "images": [], "roles": [], "contents": [],
                   "error": err.reason, "message": err.message}
            continue
        yield {"id": sample.id, "images": list(sample.images), "roles": [m["role"] for m in sample.messages],
               "contents": [m["content"] for m in sample.messages], "error": "", "message": ""}


def _write_records(data_file: Path, target: Path) -> None:
    """Parse `data_file` once and write its rows to `target` (Arrow stream format, as `datasets` writes)."""
    import pyarrow as pa

    schema = pa.schema([("id", pa.string()), ("images", pa.list_(pa.string())), ("roles", pa.list_(pa.string())),
                        ("contents", pa.list_(pa.string())), ("error", pa.string()), ("message", pa.string())])
    records = read_records(data_file)
    tmp = target.with_name(target.name + ".partial")
    with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
        batch: list[dict] = []
        for row in _rows(records):
            batch.append(row)
            if len(batch) == BATCH_ROWS:
                writer.write_batch(pa.RecordBatch.from_pylist(batch, schema=schema))
                batch = []
        writer.write_batch(pa.RecordBatch.from_pylist(batch, schema=schema))
    os.replace(tmp, target)


def records_table(data_file: Path, key: str | None = None):
    """The memory-mapped `datasets.Dataset` of `data_file`'s normalised records, written on first use.
    `key`: `records_key(data_file)`, when the caller already has it."""
    from datasets import Dataset

    folder = cache_root() / f"{data_file.stem[:40]}-{key or records_key(data_file)}"
    target = folder / "records.arrow"
    if not target.exists():
        with _locked(folder):
            if not target.exists():
                _write_records(data_file, target)
    return Dataset.from_file(str(target))


def check_records(data_path: str | Path, image_folder: str | Path | None = None) -> int:
    """Read the data file into the index (or find it there) without a tokenizer: run_zero2.sh's check before
    any rank starts, so a bad file is one line, and the ranks then find the records already indexed.
    Raises the DataError a training run would; returns how many records are well formed."""
    import pyarrow.compute as pc

    data_file, _ = locate_data(data_path, image_folder)
    records = records_table(data_file)
    usable = pc.sum(pc.equal(records.data.column("error"), "")).as_py() or 0
    if not usable:
        raise DataError("no_good_samples", f"{data_file}: none of its {len(records)} records is usable; "
                                           f"run python -m course_lib.data validate --data {data_file} to see why")
    return usable


def tokenizer_fingerprint(processor) -> str:
    """What the lengths depend on in the processor: vocabulary, merges, added tokens, template, geometry."""
    from course_lib.data.image_tokens import image_size, image_token_count

    tokenizer = processor.tokenizer
    backend = getattr(tokenizer, "backend_tokenizer", None)
    vocab = backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True)
    return digest(vocab, tokenizer.chat_template, tokenizer.eos_token, image_token_count(processor),
                   image_size(processor))


class Measure:
    """The `map` function: one row's length, images, tiles and truncation, or why it is dropped."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __call__(self, row: dict) -> dict:
        out = {"length": 0, "n_images": 0, "tiles": [], "truncated": False, "drop": row["error"],
               "why": row["message"]}
        if row["error"]:
            return out
        try:
            sample, tiles = self.dataset.sample_and_tiles(row)
            encoded = self.dataset.encode_sample(sample)
        except DataError as err:
            return {**out, "drop": err.reason, "why": err.message}
        if encoded is None:
            return {**out, "drop": "dropped_too_long",
                    "why": f"cannot fit its images and an answer token in model_max_length="
                           f"{self.dataset.model_max_length}; dropped"}
        return {**out, "length": len(encoded.input_ids), "n_images": encoded.n_images, "tiles": list(tiles),
                "truncated": encoded.truncated}


def lengths_table(records, dataset, key: str, num_proc: int | None = None):
    """`records` with the columns of `Measure`, from the cache when its key matches, else computed once
    (with a progress bar), by `num_proc` processes: by default all CPUs up to 8 from 20,000 records."""
    folder = Path(records.cache_files[0]["filename"]).parent
    if num_proc is None:
        num_proc = min(os.cpu_count() or 1, 8) if len(records) >= PARALLEL_FROM else 1
    with _locked(folder):  # one process measures; the others wait, then load the cached file
        return records.map(Measure(dataset), remove_columns=records.column_names,
                           cache_file_name=str(folder / f"lengths-{key}.arrow"), new_fingerprint=key,
                           num_proc=num_proc if num_proc > 1 else None, desc=f"measuring {len(records):,} records")


def row_sample(row: dict) -> Sample:
    messages = tuple({"role": r, "content": c} for r, c in zip(row["roles"], row["contents"], strict=True))
    return Sample(row["id"], tuple(row["images"]), messages)
