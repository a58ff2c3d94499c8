"""The training dataset: LLaVA-format records in, `input_ids` / `labels` / `pixel_values` out.

    ds = LlavaDataset("data/instruct.json", processor, template="chat", model_max_length=2048)
    ds[0] -> {"id", "input_ids": LongTensor[L], "labels": LongTensor[L], "pixel_values": [n_images, 3, H, W]}

Text is read, checked and tokenized once per data file, up front, into the data index (`data/index.py`:
Arrow files under $HF_DATASETS_CACHE that every rank and every later launch memory-maps), so `lengths`
are exact (for the length-grouped sampler and packing) and over-long samples are dropped before training
starts; images are opened lazily, in `__getitem__`. Bad samples follow one policy, `on_bad_sample`:

* "skip" (default): the sample is counted in `stats` and logged once with its id and reason (the first
  few of each reason); a sample whose image turns out to be bad is replaced by the next good one, so
  `__getitem__` never raises (unless no sample at all is usable). With DataLoader workers each worker
  process counts its own `stats`; the main process sees the counts found up front.
* "error": the first bad sample raises a one-line DataError naming the sample id and the file.

Samples too long for `model_max_length` are truncated or dropped and counted under either policy.
Its command line is the validator: `python -m course_lib.data validate --data X.json --images DIR`.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image

from course_lib.data.image_tokens import image_size
from course_lib.data.images import MAX_IMAGE_PIXELS, load_image, resolve_image_path
from course_lib.data.index import (
    digest,
    lengths_table,
    records_key,
    records_table,
    row_sample,
    tokenizer_fingerprint,
)
from course_lib.data.labels import Encoded, PromptEncoder
from course_lib.data.records import DataError, Sample, locate_data
from course_lib.data.tiling import prepare_images, tile_count, tiled_sample

__all__ = ["DataError", "LlavaDataset"]
POLICIES = ("skip", "error")
LOGGED_PER_REASON = 5
logger = logging.getLogger(__name__)


class LlavaDataset(torch.utils.data.Dataset):
    """Lazy LLaVA dataset; see the module docstring. `stats` counts every reason a sample was changed."""

    def __init__(self, data_path: str | Path, processor, image_folder: str | Path | None = None,
                 template: str = "plain", model_max_length: int = 2048, on_bad_sample: str = "skip",
                 pad_to_square: bool = False, max_image_pixels: int = MAX_IMAGE_PIXELS, image_tiling: int = 0,
                 num_proc: int | None = None):
        if on_bad_sample not in POLICIES:
            raise ValueError(f"on_bad_sample={on_bad_sample!r}; expected one of {POLICIES}")
        if model_max_length < 2:
            raise ValueError(f"model_max_length={model_max_length}; expected at least 2 tokens")
        self.data_file, self.image_folder = locate_data(data_path, image_folder)
        self.processor, self.encoder = processor, PromptEncoder(processor, template)
        self.model_max_length, self.on_bad_sample = model_max_length, on_bad_sample
        self.pad_to_square, self.max_image_pixels = pad_to_square, max_image_pixels
        self.image_tiling = image_tiling  # > 0: each image becomes up to this many tiles + a thumbnail
        self.stats: Counter = Counter()
        self._bad: set[int] = set()
        records = records_key(self.data_file)
        self._records = records_table(self.data_file, records)
        key = digest(records, template, model_max_length, image_tiling, pad_to_square,
                      self.image_folder.resolve(), tokenizer_fingerprint(processor))
        self._measured = lengths_table(self._records, self, key, num_proc)
        self._take_measurements()
        self.samples = _Samples(self)

    def _take_measurements(self) -> None:
        """Lengths and image counts of the usable rows; every dropped row counted and the first few logged."""
        import numpy as np
        import pyarrow.compute as pc

        table, n_records = self._measured.data, len(self._measured)
        drop = table.column("drop")
        self._rows = np.flatnonzero(pc.equal(drop, "").to_numpy(zero_copy_only=False))
        self.lengths: list[int] = table.column("length").take(self._rows).to_pylist()
        self.image_counts: list[int] = table.column("n_images").take(self._rows).to_pylist()
        self.stats.update({row["values"]: row["counts"] for row in pc.value_counts(drop).to_pylist()
                           if row["values"]})
        truncated = pc.sum(table.column("truncated")).as_py() or 0
        if truncated:
            self.stats["truncated"] = truncated
        if self.on_bad_sample == "error":  # the first bad record, in file order, as one line
            bad = pc.and_(pc.not_equal(drop, ""), pc.not_equal(drop, "dropped_too_long"))
            first = np.flatnonzero(bad.to_numpy(zero_copy_only=False))[:1]
            if len(first):
                raise self._dropped(int(first[0]))
        for reason in [r for r in self.stats if r != "truncated"]:
            rows = np.flatnonzero(pc.equal(drop, reason).to_numpy(zero_copy_only=False))
            for j in rows[:LOGGED_PER_REASON]:  # a million-sample set must not print a million lines
                logger.warning(f"skipping {self._dropped(int(j))}")
            if len(rows) > LOGGED_PER_REASON:
                logger.warning(f"more samples with {reason}: no longer logged, see dataset.stats")
        if not len(self):
            why = f" ({dict(self.stats)}; see the warnings above)" if n_records else ""
            raise DataError("no_good_samples", f"{self.data_file}: none of its {n_records} records is usable{why}")
        if self.stats:
            logger.warning(f"{self.data_file}: kept {len(self)} of {n_records} samples; {dict(self.stats)}")
        counts = pc.value_counts(self._records.data.column("id"))
        repeated = counts.filter(pc.greater(counts.field("counts"), 1)).field("values").to_pylist()
        if repeated:  # harmless for training; eval joins answers by id, where it is an error
            logger.warning(f"{self.data_file}: {len(repeated)} ids are used more than once (first: {repeated[0]!r})")

    def _dropped(self, row: int) -> DataError:
        measured = self._measured[row]
        return DataError(measured["drop"], measured["why"]).about(self._records[row]["id"], self.data_file)

    def sample_and_tiles(self, row: dict) -> tuple[Sample, tuple[int, ...]]:
        """The sample of a records row, tiled when tiling is on, and each image's tile count, read from the
        images' headers: what the index measures (`_sample` then reuses the counts it stored)."""
        sample = row_sample(row)
        paths = [resolve_image_path(self.image_folder, relpath) for relpath in sample.images]
        counts = tuple(self._tile_count(path) for path in paths) if self.image_tiling else ()
        return (tiled_sample(sample, counts) if counts else sample), counts

    def _tile_count(self, path: Path) -> int:
        """Tiles + thumbnail this image becomes, from its header (the pixels are decoded in __getitem__)."""
        try:
            with Image.open(path) as image:
                width, height = image.size
        except (OSError, Image.DecompressionBombError) as err:
            raise DataError("bad_image", f"cannot read the size of image {path.name}: {err}") from None
        if self.pad_to_square:
            width = height = max(width, height)
        return tile_count(width, height, image_size(self.processor)[0], self.image_tiling)

    def _note(self, reason: str, message: str) -> None:
        """Count; log the first few of each reason (a million-sample set must not print a million lines)."""
        self.stats[reason] += 1
        if self.stats[reason] <= LOGGED_PER_REASON:
            logger.warning(message)
        elif self.stats[reason] == LOGGED_PER_REASON + 1:
            logger.warning(f"more samples with {reason}: no longer logged, see dataset.stats")

    def _report(self, err: DataError) -> None:
        if self.on_bad_sample == "error":
            raise err
        self._note(err.reason, f"skipping {err}")

    @property
    def modality_lengths(self) -> list[int]:
        """LLaVA's convention for modality grouping: text-only samples have negative lengths."""
        return [n if k else -n for n, k in zip(self.lengths, self.image_counts, strict=True)]

    def __len__(self) -> int:
        return len(self._rows)

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} samples")
        for step in range(len(self)):  # skip policy: the next good sample, deterministically
            j = (index + step) % len(self)
            if j in self._bad:
                continue
            try:
                return self._item(j)
            except DataError as err:
                self._bad.add(j)
                self._report(err.about(self.samples[j].id, self.data_file))
        raise DataError("no_good_samples", f"every sample of {self.data_file} is bad; see the warnings above")

    def _sample(self, index: int) -> tuple[Sample, tuple[int, ...]]:
        """Usable sample `index` and its images' tile counts, as indexed: no image is opened."""
        row = int(self._rows[index])
        counts = tuple(self._measured.data.column("tiles")[row].as_py())
        sample = row_sample(self._records[row])
        return (tiled_sample(sample, counts) if counts else sample), counts

    def encode_sample(self, sample: Sample) -> Encoded:
        """input_ids / labels of `sample` with this dataset's template, truncated to `model_max_length`."""
        return self.encoder.truncate(self.encoder.encode(sample), self.model_max_length)

    def encoded(self, index: int) -> Encoded:
        """input_ids / labels of sample `index` as the dataset returns them (truncated if needed)."""
        return self.encode_sample(self._sample(index)[0])

    def _item(self, index: int) -> dict:
        sample, counts = self._sample(index)
        encoded = self.encode_sample(sample)
        if counts:  # tiled: each image once (its first tile's path), then its tiles
            firsts = [sample.images[sum(counts[:k])] for k in range(len(counts))]
            pixels = self.pixel_values([resolve_image_path(self.image_folder, p) for p in firsts],
                                       keep=encoded.n_images)
        else:
            pixels = self.pixel_values([resolve_image_path(self.image_folder, p)
                                        for p in sample.images[:encoded.n_images]])
        if len(pixels) != encoded.n_images:  # an image replaced by one of another shape since it was indexed
            raise DataError("image_changed", f"{len(pixels)} tiles for {encoded.n_images} image token runs; an image "
                                             "changed size after the data index was written (tiling)")
        return {
            "id": sample.id,
            "input_ids": torch.tensor(encoded.input_ids, dtype=torch.long),
            "labels": torch.tensor(encoded.labels, dtype=torch.long),
            "pixel_values": pixels,
        }

    def pixel_values(self, paths: list[Path], keep: int | None = None) -> torch.Tensor:
        """[n, 3, H, W] for the images at `paths` (tiled: their first `keep` tiles); [0, 3, H, W] for none."""
        images = prepare_images([load_image(p, self.max_image_pixels) for p in paths], self.processor,
                                self.pad_to_square, self.image_tiling)[0][:keep]
        height, width = image_size(self.processor)
        if not images:
            return torch.zeros(0, 3, height, width)
        try:
            pixels = self.processor.image_processor(images=images, return_tensors="pt",
                                                    input_data_format="channels_last")["pixel_values"]
        except (ValueError, OSError, RuntimeError) as err:
            raise DataError("bad_image", f"the image processor refused {paths}: {err}") from None
        if tuple(pixels.shape[-2:]) != (height, width):  # the token count assumed this size
            raise DataError("processor", f"pixel_values are {tuple(pixels.shape[-2:])}, expected {(height, width)}")
        return pixels


class _Samples(Sequence):
    """`dataset.samples[k]`: the k-th usable sample (tiled when tiling is on), read from the index on demand."""

    def __init__(self, dataset: LlavaDataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, k: int) -> Sample:
        if not -len(self) <= k < len(self):
            raise IndexError(f"sample {k} out of range for {len(self)} samples")
        return self.dataset._sample(k % len(self))[0]
