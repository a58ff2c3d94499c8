"""Length-grouped batches, with LLaVA's modality grouping: less padding, fuller packs, no mixed batches."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import Sampler


def _batches(order: list[int], lengths: Sequence[int], batch_size: int, mega_batch_mult: int) -> list[list[int]]:
    """Cut `order` into megabatches, sort each longest first, and cut those into batches."""
    mega = batch_size * max(1, min(len(order) // (batch_size * 4), mega_batch_mult))
    ordered = [j for i in range(0, len(order), mega)
               for j in sorted(order[i:i + mega], key=lambda j: abs(lengths[j]), reverse=True)]
    return [ordered[i:i + batch_size] for i in range(0, len(ordered), batch_size)]


class LengthGroupedSampler(Sampler):
    """Batches of similar lengths (less padding, fuller packs) in a random order, deterministic by seed.

    Shuffle, cut into megabatches of `mega_batch_mult` batches, sort each megabatch by length and cut
    it into batches (transformers' trainer_pt_utils.get_length_grouped_indices); then shuffle the
    batches and put the one with the longest sample first, so an out-of-memory shows at step 1.
    With `group_by_modality`, `lengths` follow LLaVA's `modality_lengths` (negative = text-only; see
    LlavaDataset.modality_lengths) and a batch never mixes image and text-only samples, except the
    last one (LLaVA's modality-grouped LengthGroupedSampler, haotian-liu/LLaVA llava/train/llava_trainer.py).
    Pass `batch_size` = per-device batch size * world size so each step's ranks get similar lengths.
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int = 0, group_by_modality: bool = False,
                 mega_batch_mult: int = 50):
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size}; expected >= 1")
        self.lengths, self.batch_size, self.seed = list(lengths), batch_size, seed
        self.group_by_modality, self.mega_batch_mult, self.epoch = group_by_modality, mega_batch_mult, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(len(self.lengths), generator=generator).tolist()
        parts = [[j for j in order if self.lengths[j] >= 0], [j for j in order if self.lengths[j] < 0]]
        parts = parts if self.group_by_modality else [order]
        batches = [b for part in parts for b in _batches(part, self.lengths, self.batch_size, self.mega_batch_mult)]
        full = [b for b in batches if len(b) == self.batch_size]
        full = [full[k] for k in torch.randperm(len(full), generator=generator).tolist()]
        if full:
            longest = max(range(len(full)), key=lambda k: max(abs(self.lengths[j]) for j in full[k]))
            full[0], full[longest] = full[longest], full[0]
        rest = [j for b in batches if len(b) < self.batch_size for j in b]
        return iter([j for b in full for j in b] + rest)
