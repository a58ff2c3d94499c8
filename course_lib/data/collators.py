"""Batches for the Llava model: padded rows, packed rows, a left-padded baseline; a length-grouped sampler.

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

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from course_lib.data.labels import IGNORE_INDEX


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


def first_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Bin packing: indices of `lengths` grouped into bins whose lengths sum to <= `capacity`.

    First-fit decreasing: take the samples longest first and put each in the first bin with room. It
    uses at most 11/9 of the optimal number of bins (+ 6/9), and in practice is within a bin or two.
    Each bin keeps its samples in their original order.
    """
    too_long = [i for i, n in enumerate(lengths) if n > capacity]
    if too_long:
        raise ValueError(f"sample {too_long[0]} has {lengths[too_long[0]]} tokens > capacity {capacity}")
    bins: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        k = next((k for k, r in enumerate(room) if r >= lengths[i]), len(bins))
        if k == len(bins):
            bins.append([])
            room.append(capacity)
        bins[k].append(i)
        room[k] -= lengths[i]
    return [sorted(b) for b in bins]


class PackedCollator:
    """Samples end to end with no padding between them: one row [1, T], or rows of <= `row_tokens`.

    * `row_tokens=None`: every item of the batch in one row (transformers' `DataCollatorWithFlattening`),
      with FlashAttention's varlen kwargs `cu_seq_lens_*`: FlashAttention-2 then never computes a
      score between two samples, so a long row costs nothing extra.
    * `row_tokens=C`: the items are packed into rows of at most C tokens by first-fit decreasing, and
      the rows are padded to the longest row. This is the layout for SDPA and eager attention, whose
      block-diagonal mask is a dense [T, T] matrix: one row of the whole batch would cost T^2 attention
      work, rows of C cost T * C. The padding tail of a row is its own pseudo-sample (positions
      restarting at 0, labels IGNORE_INDEX), so no real token attends to it.

    Each sample's first label is set to IGNORE_INDEX (as `DataCollatorWithFlattening` does): the loss
    shifts labels by one, and the last token of one sample must not learn to predict the next sample.
    Padded rows never use a first label either, so packed and padded losses are the same.
    Images follow their samples: `pixel_values` are concatenated in the packed order.
    """

    def __init__(self, max_tokens: int, row_tokens: int | None = None, pad_token_id: int = 0):
        self.max_tokens, self.row_tokens, self.pad_token_id = max_tokens, row_tokens, pad_token_id

    def __call__(self, items: Sequence[dict]) -> dict:
        if not items:
            raise ValueError("PackedCollator got an empty batch")
        lengths = [len(it["input_ids"]) for it in items]
        if sum(lengths) > self.max_tokens:
            raise ValueError(f"PackedCollator: the batch has {sum(lengths)} tokens > max_tokens={self.max_tokens}; "
                             "use max_tokens >= batch size * model_max_length, or a smaller batch")
        rows = [list(range(len(items)))] if self.row_tokens is None else first_fit_decreasing(lengths, self.row_tokens)
        width = max(sum(lengths[i] for i in row) for row in rows)
        input_ids, labels, position_ids = [], [], []
        for row in rows:
            pad = width - sum(lengths[i] for i in row)
            input_ids.append(torch.cat([items[i]["input_ids"] for i in row]
                                       + [torch.full((pad,), self.pad_token_id, dtype=torch.long)]))
            labels.append(torch.cat([torch.cat([torch.tensor([IGNORE_INDEX]), items[i]["labels"][1:]]) for i in row]
                                    + [torch.full((pad,), IGNORE_INDEX, dtype=torch.long)]))
            position_ids.append(torch.cat([torch.arange(lengths[i]) for i in row] + [torch.arange(pad)]))
        batch = {
            "input_ids": torch.stack(input_ids),
            "labels": torch.stack(labels),
            "position_ids": torch.stack(position_ids),
            # transformers only looks for packed samples when there is no KV cache
            # (masking_utils._preprocess_mask_arguments); with the config's use_cache=True a cache is
            # created even in training, and every sample would then attend to the ones before it.
            "use_cache": False,
        }
        if self.row_tokens is None:
            cu_seq_lens = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
            batch.update(cu_seq_lens_q=cu_seq_lens, cu_seq_lens_k=cu_seq_lens,  # FlashAttentionKwargs
                         max_length_q=max(lengths), max_length_k=max(lengths))
        pixels = _pixel_values([items[i] for row in rows for i in row])
        if pixels is not None:
            batch["pixel_values"] = pixels
        return batch


class ReferenceCollator:
    """The batching of the LLaVA-from-scratch tutorials this course is measured against: left-padded.

    Every row is left-padded to the longest sample of the batch, in whatever order the sampler gives
    (no length grouping), and the attention mask is `input_ids != pad_token_id`. That last habit
    also masks any pad token that is real text (Qwen's pad is `<|endoftext|>`); the course's
    `PaddedCollator` takes the mask from the lengths instead. Kept as the baseline of
    `benchmarks/packing.py`, so speedups are against what learners would otherwise run.
    """

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, items: Sequence[dict]) -> dict[str, torch.Tensor]:
        width = max(len(it["input_ids"]) for it in items)
        input_ids = torch.stack([F.pad(it["input_ids"], (width - len(it["input_ids"]), 0), value=self.pad_token_id)
                                 for it in items])
        labels = torch.stack([F.pad(it["labels"], (width - len(it["labels"]), 0), value=IGNORE_INDEX) for it in items])
        batch = {"input_ids": input_ids, "attention_mask": (input_ids != self.pad_token_id).long(), "labels": labels}
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
