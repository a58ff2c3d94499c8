"""Batches for the Llava model: padded rows, or one packed row; and a length-grouped sampler.

Both collators take `LlavaDataset` items, drop the string "id" (models take tensors only; use
`remove_unused_columns=False` with HF Trainer, which would otherwise drop our keys), and concatenate
every item's `pixel_values` in batch order: the model's `masked_scatter` fills the image tokens in
reading order, so image k of the batch lands on the k-th run of image tokens.

Packing (padding-free) follows transformers' `DataCollatorWithFlattening`: one row [1, T],
`position_ids` restarting at 0 for each sample, and FlashAttention's varlen kwargs. Without an
attention_mask, transformers (masking_utils.find_packed_sequence_indices) reads the restarts of
`position_ids` as sample boundaries and builds a block-diagonal causal mask for SDPA/eager, so no
sample attends to another; FlashAttention uses `cu_seq_lens_*` instead. That detection is skipped
when the model makes a KV cache, so the packed batch carries `use_cache=False`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import Sampler

from .templates import IGNORE_INDEX


def _pixel_values(items: Sequence[dict]) -> torch.Tensor | None:
    """All images of the batch, in order; None when the batch has none (the key is then left out)."""
    pixels = [it["pixel_values"] for it in items if it.get("pixel_values") is not None and len(it["pixel_values"])]
    return torch.cat(pixels) if pixels else None


class PaddedCollator:
    """Right-padded rows: input_ids, attention_mask, labels (padding is IGNORE_INDEX), pixel_values.

    The attention mask comes from the lengths, not from `input_ids != pad_token_id`, so a pad token
    that also occurs in the text (Qwen's `<|endoftext|>`) is never masked by mistake.
    """

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, items: Sequence[dict]) -> dict[str, torch.Tensor]:
        if not items:
            raise ValueError("PaddedCollator got an empty batch")
        width = max(len(it["input_ids"]) for it in items)
        input_ids = torch.full((len(items), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(items), width), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(items), width), dtype=torch.long)
        for row, item in enumerate(items):
            n = len(item["input_ids"])
            input_ids[row, :n], labels[row, :n], attention_mask[row, :n] = item["input_ids"], item["labels"], 1
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        pixels = _pixel_values(items)
        if pixels is not None:
            batch["pixel_values"] = pixels
        return batch


class PackedCollator:
    """All items of the batch in one row [1, T] with T <= max_tokens; no padding, no attention_mask.

    Each sample's first label is set to IGNORE_INDEX (as `DataCollatorWithFlattening` does): the loss
    shifts labels by one, and the last token of one sample must not learn to predict the next sample.
    Padded rows never use a first label either, so packed and padded losses are the same.
    """

    def __init__(self, max_tokens: int):
        self.max_tokens = max_tokens

    def __call__(self, items: Sequence[dict]) -> dict:
        if not items:
            raise ValueError("PackedCollator got an empty batch")
        lengths = [len(it["input_ids"]) for it in items]
        if sum(lengths) > self.max_tokens:
            raise ValueError(f"PackedCollator: the batch has {sum(lengths)} tokens > max_tokens={self.max_tokens}; "
                             "use max_tokens >= batch size * model_max_length, or a smaller batch")
        labels = [it["labels"].clone() for it in items]
        for row in labels:
            row[0] = IGNORE_INDEX
        cu_seq_lens = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
        batch = {
            "input_ids": torch.cat([it["input_ids"] for it in items])[None],
            "labels": torch.cat(labels)[None],
            "position_ids": torch.cat([torch.arange(n) for n in lengths])[None],
            "cu_seq_lens_q": cu_seq_lens,  # FlashAttentionKwargs, named as transformers names them
            "cu_seq_lens_k": cu_seq_lens,
            "max_length_q": max(lengths),
            "max_length_k": max(lengths),
            # transformers only looks for packed samples when there is no KV cache
            # (masking_utils._preprocess_mask_arguments); with the config's use_cache=True a cache is
            # created even in training, and every sample would then attend to the ones before it.
            "use_cache": False,
        }
        pixels = _pixel_values(items)
        if pixels is not None:
            batch["pixel_values"] = pixels
        return batch


def attention_matrix(position_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                     length: int | None = None) -> torch.Tensor:
    """The [T, T] boolean mask of who attends to whom, for one row (for pictures and tests).

    Causal, AND same packed sample (position_ids restarting, as in find_packed_sequence_indices),
    AND key is not padding (attention_mask).
    """
    n = length or (len(position_ids) if position_ids is not None else len(attention_mask))
    allowed = torch.ones(n, n, dtype=torch.bool).tril()
    if position_ids is not None:
        sample = (torch.diff(position_ids, prepend=position_ids[:1] - 1) != 1).cumsum(0)
        allowed &= sample[:, None] == sample[None, :]
    if attention_mask is not None:
        allowed &= attention_mask.bool()[None, :]
    return allowed


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
