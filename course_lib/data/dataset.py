"""The training dataset: LLaVA-format records in, `input_ids` / `labels` / `pixel_values` out.

    ds = LlavaDataset("data/instruct.json", processor, template="chat", model_max_length=2048)
    ds[0] -> {"id", "input_ids": LongTensor[L], "labels": LongTensor[L], "pixel_values": [n_images, 3, H, W]}

Text is read, checked and tokenized once, up front, so `lengths` are exact (for the length-grouped
sampler and packing) and over-long samples are dropped before training starts; images are opened
lazily, in `__getitem__`. Bad samples follow one policy, `on_bad_sample`:

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
from pathlib import Path

import torch
from PIL import Image

from course_lib.data.image_tokens import image_size
from course_lib.data.images import MAX_IMAGE_PIXELS, load_image, resolve_image_path
from course_lib.data.labels import Encoded, PromptEncoder
from course_lib.data.records import DataError, Sample, duplicate_ids, locate_data, read_records, record_id, to_sample
from course_lib.data.tiling import prepare_images, tile_count, tiled_sample

__all__ = ["DataError", "LlavaDataset"]
POLICIES = ("skip", "error")
LOGGED_PER_REASON = 5
logger = logging.getLogger(__name__)


class LlavaDataset(torch.utils.data.Dataset):
    """Lazy LLaVA dataset; see the module docstring. `stats` counts every reason a sample was changed."""

    def __init__(self, data_path: str | Path, processor, image_folder: str | Path | None = None,
                 template: str = "plain", model_max_length: int = 2048, on_bad_sample: str = "skip",
                 pad_to_square: bool = False, max_image_pixels: int = MAX_IMAGE_PIXELS, image_tiling: int = 0):
        if on_bad_sample not in POLICIES:
            raise ValueError(f"on_bad_sample={on_bad_sample!r}; expected one of {POLICIES}")
        if model_max_length < 2:
            raise ValueError(f"model_max_length={model_max_length}; expected at least 2 tokens")
        self.data_file, self.image_folder = locate_data(data_path, image_folder)
        self.processor, self.encoder = processor, PromptEncoder(processor, template)
        self.model_max_length, self.on_bad_sample = model_max_length, on_bad_sample
        self.pad_to_square, self.max_image_pixels = pad_to_square, max_image_pixels
        self.image_tiling = image_tiling  # > 0: each image becomes up to this many tiles + a thumbnail
        self.tile_counts: list[tuple[int, ...]] = []
        self.stats: Counter = Counter()
        self.samples: list[Sample] = []
        self.lengths: list[int] = []
        self.image_counts: list[int] = []
        self._bad: set[int] = set()
        records = read_records(self.data_file)
        for index, record in enumerate(records):
            self._add(record, index)
        if not self.samples:
            raise DataError("no_good_samples", f"{self.data_file}: none of its {len(records)} records is usable"
                                               + (f" ({dict(self.stats)}; see the warnings above)" if records else ""))
        if self.stats:
            logger.warning(f"{self.data_file}: kept {len(self)} of {len(records)} samples; {dict(self.stats)}")
        repeated = duplicate_ids(records)
        if repeated:  # harmless for training; eval joins answers by id, where it is an error
            logger.warning(f"{self.data_file}: {len(repeated)} ids are used more than once (first: {repeated[0]!r})")

    def _add(self, record, index: int) -> None:
        try:
            sample = to_sample(record, index)
            paths = [resolve_image_path(self.image_folder, relpath) for relpath in sample.images]
            counts = tuple(self._tile_count(path) for path in paths) if self.image_tiling else ()
            if counts:
                sample = tiled_sample(sample, counts)
            encoded = self.encoder.truncate(self.encoder.encode(sample), self.model_max_length)
        except DataError as err:
            self._report(err.about(record_id(record, index), self.data_file))
            return
        if encoded is None:
            self._note("dropped_too_long", f"sample {sample.id!r} cannot fit its images and an answer token in "
                                           f"model_max_length={self.model_max_length}; dropped")
            return
        if encoded.truncated:
            self.stats["truncated"] += 1
        self.samples.append(sample)
        self.tile_counts.append(counts)
        self.lengths.append(len(encoded.input_ids))
        self.image_counts.append(encoded.n_images)

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
        return len(self.samples)

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

    def encoded(self, index: int) -> Encoded:
        """input_ids / labels of sample `index` as the dataset returns them (truncated if needed)."""
        return self.encoder.truncate(self.encoder.encode(self.samples[index]), self.model_max_length)

    def _item(self, index: int) -> dict:
        sample, encoded = self.samples[index], self.encoded(index)
        if self.tile_counts[index]:  # tiled: each image once (its first tile's path), then its tiles
            counts = self.tile_counts[index]
            firsts = [sample.images[sum(counts[:k])] for k in range(len(counts))]
            pixels = self.pixel_values([resolve_image_path(self.image_folder, p) for p in firsts],
                                       keep=encoded.n_images)
        else:
            pixels = self.pixel_values([resolve_image_path(self.image_folder, p)
                                        for p in sample.images[:encoded.n_images]])
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
