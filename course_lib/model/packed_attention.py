"""SDPA that skips the work between packed samples: one SDPA call per sample of a packed row.

transformers turns a packed row's restarting `position_ids` into a block-diagonal causal mask, and SDPA
given a mask computes every query-key pair of the row: a 1024-token row holding three samples pays for
1024^2 pairs where the samples need only the sum of their squares. On a GPU, FlashAttention-2's varlen
kernel skips the blocks between samples; FlexAttention would too, but it has no backward on CPU (torch
2.13). This attention function reads the diagonal blocks off the mask and attends within each one, with
SDPA's causal fast path where a block is plainly causal: the same numbers, less work.

    from course_lib.model.packed_attention import use_for_packing
    use_for_packing(llava)   # what `course_lib.train --packing true` does when the LM runs on SDPA

Rows that are not packed (a padded batch, generation with a KV cache) fall through to transformers' SDPA.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

NAME = "sdpa_packed"


def diagonal_blocks(mask: torch.Tensor, min_block: int = 32) -> list[tuple[int, int]]:
    """[T, T] boolean mask (True = may attend) -> the (start, end) blocks it splits into exactly.

    A block may start at i when no query at or after i sees a key before i, and no query before i sees a
    key at or after i; attending within the blocks is then the same computation as attending with the
    whole mask. A mask that does not split gives one block, the whole row. Blocks shorter than `min_block`
    join their neighbour (still exact, with the mask): left padding, where every pad token sees nothing,
    would otherwise cost one SDPA call per pad token.
    """
    length = mask.shape[-1]
    index = torch.arange(length, device=mask.device)
    sees = mask.any(-1)
    first = torch.where(sees, mask.byte().argmax(-1), index)  # the earliest key each query sees
    last = torch.where(sees, length - 1 - mask.flip(-1).byte().argmax(-1), index)  # and the latest
    earliest_after = first.flip(0).cummin(0).values.flip(0)  # min over queries >= i
    latest_before = last.cummax(0).values  # max over queries <= i
    cuts = ((earliest_after[1:] >= index[1:]) & (latest_before[:-1] < index[1:])).nonzero().flatten() + 1
    bounds = [0, *cuts.tolist(), length]
    blocks: list[tuple[int, int]] = []
    for start, end in zip(bounds[:-1], bounds[1:]):
        if blocks and min(end - start, blocks[-1][1] - blocks[-1][0]) < min_block:
            blocks[-1] = (blocks[-1][0], end)
        else:
            blocks.append((start, end))
    return blocks


def sdpa_packed_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                                  value: torch.Tensor, attention_mask: torch.Tensor | None, dropout: float = 0.0,
                                  scaling: float | None = None, is_causal: bool | None = None, **kwargs):
    """transformers' attention-function signature; query/key/value are [B, heads, T, D]."""
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

    # One flat row from the collator carries its samples' bounds (FlashAttention's `cu_seq_lens_q`): every
    # block is then plainly causal, and the [T, T] mask need not be read.
    bounds = kwargs.get("cu_seq_lens_q")
    flat_row = (bounds is not None and query.shape[0] == 1 and query.shape[2] == key.shape[2] == int(bounds[-1]))
    packed = flat_row or (attention_mask is not None and attention_mask.dtype == torch.bool
                          and attention_mask.dim() == 4 and attention_mask.shape[1] == 1
                          and query.shape[2] == key.shape[2] > 1)
    if not packed:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    groups = getattr(module, "num_key_value_groups", 1)
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    batch, heads, length, dim = query.shape
    if flat_row:  # (start, end, mask) per sample; None: plainly causal
        cuts = bounds.tolist()
        blocks = [(start, end, None) for start, end in zip(cuts[:-1], cuts[1:])]
    else:
        row_masks = [attention_mask[min(b, attention_mask.shape[0] - 1), 0] for b in range(batch)]  # [T, T] each
        blocks = [(b * length + start, b * length + end, row_masks[b][start:end, start:end])
                  for b in range(batch) for start, end in diagonal_blocks(row_masks[b])]
    # One split of the flat [B*T, heads, D] tokens into every row's blocks, and one cat back: slicing each
    # block out separately costs a full-size gradient per slice in the backward pass, as much as it saves.
    sizes = [end - start for start, end, _ in blocks]
    flat = [x.transpose(1, 2).reshape(batch * length, heads, x.shape[-1]).split(sizes) for x in (query, key, value)]
    causal = torch.ones(max(sizes), max(sizes), dtype=torch.bool, device=query.device).tril()
    outs = []
    for (start, end, block), q, k, v in zip(blocks, *flat, strict=True):
        plain = block is None or torch.equal(block, causal[: end - start, : end - start])  # SDPA's fast causal kernel
        out = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                                             attn_mask=None if plain else block, dropout_p=dropout, scale=scaling,
                                             is_causal=plain)
        outs.append(out[0].transpose(0, 1))
    return torch.cat(outs).view(batch, length, heads, value.shape[-1]), None


def register() -> None:
    """Make `NAME` an attention implementation transformers knows, with SDPA's boolean masks."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, sdpa_packed_attention_forward)
    AttentionMaskInterface.register(NAME, sdpa_mask)


def use_for_packing(model) -> bool:
    """Switch a LLaVA's language model from SDPA to `NAME` for packed training; True if it switched.

    The numbers stay the same, only the work between samples goes. FlashAttention-2 (varlen) and eager
    are left as they are, and so is the vision tower (it never sees packed rows). The choice is not saved
    with the model: transformers does not write the attention implementation into config.json.
    """
    if getattr(model.config.text_config, "_attn_implementation", None) != "sdpa":
        return False
    register()
    model.set_attn_implementation({"text_config": NAME})
    return True
