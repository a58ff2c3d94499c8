"""Collators and the sampler: padded and packed batches give the same loss; packed samples stay apart."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers.masking_utils import create_causal_mask, find_packed_sequence_indices

from course_lib.data.collators import (
    PackedCollator,
    PaddedCollator,
    ReferenceCollator,
    attention_matrix,
    first_fit_decreasing,
)
from course_lib.data.dataset import LlavaDataset
from course_lib.data.sampler import LengthGroupedSampler


@pytest.fixture(scope="module")
def dataset(tiny_world, empty_llava):
    return LlavaDataset(tiny_world.data / "instruct" / "instruct.json", empty_llava[2], template="chat")


@pytest.fixture(scope="module")
def items(dataset):
    """Two images, one image over several turns, text-only, one image: a mixed batch."""
    def first(test):
        return next(k for k in range(len(dataset)) if test(k))

    picks = [first(lambda k: dataset.image_counts[k] == 2),
             first(lambda k: dataset.image_counts[k] == 1 and len(dataset.samples[k].messages) > 2),
             first(lambda k: dataset.image_counts[k] == 0),
             first(lambda k: dataset.image_counts[k] == 1 and len(dataset.samples[k].messages) == 2)]
    return [dataset[k] for k in picks]


def test_padded_batch(items, empty_llava):
    pad = empty_llava[2].tokenizer.pad_token_id
    batch = PaddedCollator(pad)(items)
    lengths = [len(it["input_ids"]) for it in items]
    assert set(batch) == {"input_ids", "attention_mask", "labels", "pixel_values"}  # no "id"
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (4, max(lengths))
    assert batch["attention_mask"].sum(1).tolist() == lengths
    for row, (item, n) in enumerate(zip(items, lengths, strict=True)):
        assert torch.equal(batch["input_ids"][row, :n], item["input_ids"])  # right padding
        assert (batch["input_ids"][row, n:] == pad).all() and (batch["labels"][row, n:] == -100).all()
    assert torch.equal(batch["pixel_values"], torch.cat([it["pixel_values"] for it in items]))
    assert batch["pixel_values"].shape[0] == 4
    assert "pixel_values" not in PaddedCollator(pad)([items[2]])  # text-only batch: no key


def test_packed_batch(items):
    batch = PackedCollator(max_tokens=1000)(items)
    lengths = [len(it["input_ids"]) for it in items]
    total = sum(lengths)
    assert "id" not in batch and "attention_mask" not in batch and batch["use_cache"] is False
    assert batch["input_ids"].shape == batch["labels"].shape == batch["position_ids"].shape == (1, total)
    assert batch["position_ids"][0].tolist() == [p for n in lengths for p in range(n)]
    cu = [0, *torch.tensor(lengths).cumsum(0).tolist()]
    assert batch["cu_seq_lens_q"].tolist() == batch["cu_seq_lens_k"].tolist() == cu
    assert batch["cu_seq_lens_q"].dtype == torch.int32
    assert batch["max_length_q"] == batch["max_length_k"] == max(lengths)
    assert (batch["labels"][0, cu[:-1]] == -100).all()  # no sample learns to predict the next one's first token
    assert torch.equal(batch["pixel_values"], torch.cat([it["pixel_values"] for it in items]))
    with pytest.raises(ValueError, match=f"the batch has {total} tokens > max_tokens=100"):
        PackedCollator(max_tokens=100)(items)


def test_packed_loss_equals_padded_loss(items, empty_llava):
    _, model, processor = empty_llava
    assert next(model.parameters()).dtype == torch.float32
    with torch.no_grad():
        padded = model(**PaddedCollator(processor.tokenizer.pad_token_id)(items)).loss
        packed = model(**PackedCollator(max_tokens=1000)(items)).loss
    assert abs(padded.item() - packed.item()) < 1e-5, (padded.item(), packed.item())
    # What `course_lib.train --packing true` trains with on SDPA: attention per sample inside the row.
    from course_lib.model.packed_attention import NAME, use_for_packing

    try:
        assert use_for_packing(model) and model.config.text_config._attn_implementation == NAME
        with torch.no_grad():
            per_sample = model(**PackedCollator(max_tokens=1000)(items)).loss
    finally:
        model.set_attn_implementation({"text_config": "sdpa"})
    assert abs(padded.item() - per_sample.item()) < 1e-5, (padded.item(), per_sample.item())


def test_first_fit_decreasing_by_hand():
    # Longest first: 7 opens bin A, 6 opens B, 5 opens C, 4 -> B (room 4), 3 -> A, 2 -> C; 1 -> C.
    assert first_fit_decreasing([3, 7, 5, 6, 2, 4, 1], capacity=10) == [[0, 1], [3, 5], [2, 4, 6]]
    assert first_fit_decreasing([10, 10], capacity=10) == [[0], [1]]
    with pytest.raises(ValueError, match="sample 1 has 11 tokens > capacity 10"):
        first_fit_decreasing([3, 11], capacity=10)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(1, 100), min_size=1, max_size=60), st.integers(100, 300))
def test_first_fit_decreasing_is_a_partition_within_capacity(lengths, capacity):
    bins = first_fit_decreasing(lengths, capacity)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= capacity for b in bins)
    # Never more than one bin that is at most half full (two such bins would have been merged by first fit).
    assert sum(2 * sum(lengths[i] for i in b) <= capacity for b in bins) <= 1


def test_packed_rows_loss_and_layout(items, empty_llava):
    _, model, processor = empty_llava
    lengths = [len(it["input_ids"]) for it in items]
    cap = max(lengths) + min(lengths)  # the longest sample cannot share a row with any but the shortest
    batch = PackedCollator(max_tokens=1000, row_tokens=cap, pad_token_id=processor.tokenizer.pad_token_id)(items)
    rows = first_fit_decreasing(lengths, cap)
    assert batch["input_ids"].shape[0] == len(rows) > 1 and "cu_seq_lens_q" not in batch
    # Images follow their samples: pixel_values in packed order.
    order = [i for row in rows for i in row]
    with_images = [items[i]["pixel_values"] for i in order if items[i].get("pixel_values") is not None]
    assert torch.equal(batch["pixel_values"], torch.cat([p for p in with_images if len(p)]))
    real = (batch["labels"] != -100).sum().item()
    assert real == sum((it["labels"][1:] != -100).sum().item() for it in items)
    with torch.no_grad():
        padded = model(**PaddedCollator(processor.tokenizer.pad_token_id)(items)).loss
        packed = model(**batch).loss
    assert abs(padded.item() - packed.item()) < 1e-5, (padded.item(), packed.item())


def test_reference_collator_left_pads_and_masks_by_pad_id(items, empty_llava):
    _, model, processor = empty_llava
    pad = processor.tokenizer.pad_token_id
    batch = ReferenceCollator(pad)(items)
    lengths = [len(it["input_ids"]) for it in items]
    for row, (item, n) in enumerate(zip(items, lengths, strict=True)):
        assert torch.equal(batch["input_ids"][row, -n:], item["input_ids"])  # left padding
        assert batch["attention_mask"][row].sum() == n - (item["input_ids"] == pad).sum()
    # RoPE only sees relative positions, so shifting a sample right does not change its loss.
    with torch.no_grad():
        padded = model(**PaddedCollator(pad)(items)).loss
        left = model(**batch).loss
    assert abs(padded.item() - left.item()) < 1e-4, (padded.item(), left.item())


def _logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits[0]


def test_packed_samples_cannot_see_each_other(items, empty_llava):
    model = empty_llava[1]
    a, b = items[2], items[3]  # text-only, then one image
    batch = PackedCollator(max_tokens=1000)([a, b])
    n = len(a["input_ids"])
    changed = dict(batch, input_ids=batch["input_ids"].clone())
    changed["input_ids"][0, 1:n - 1] = torch.randint(0, 300, (n - 2,), generator=torch.Generator().manual_seed(0))
    before, after = _logits(model, batch), _logits(model, changed)
    assert (before[:n] - after[:n]).abs().max() > 1e-2  # A did change
    assert (before[n:] - after[n:]).abs().max() < 1e-5  # B did not notice
    alone = _logits(model, PackedCollator(max_tokens=1000)([b]))
    assert (before[n:] - alone).abs().max() < 1e-5
    # Without restarting positions the row is one long sample, and B does see A: the check can fail.
    one_sample = torch.arange(batch["input_ids"].shape[1])[None]
    leaky_before = _logits(model, dict(batch, position_ids=one_sample))
    leaky_after = _logits(model, dict(changed, position_ids=one_sample))
    assert (leaky_before[n:] - leaky_after[n:]).abs().max() > 1e-3


def test_transformers_builds_a_block_diagonal_mask_from_position_ids(empty_llava):
    position_ids = PackedCollator(max_tokens=100)([{"input_ids": torch.ones(n, dtype=torch.long),
                                                    "labels": torch.ones(n, dtype=torch.long)} for n in (3, 2, 4)])
    position_ids = position_ids["position_ids"]
    assert find_packed_sequence_indices(position_ids).tolist() == [[0, 0, 0, 1, 1, 2, 2, 2, 2]]
    config = empty_llava[1].config.text_config
    mask = create_causal_mask(config, torch.zeros(1, 9, 4), None, None, position_ids=position_ids)
    assert torch.equal(mask[0, 0], attention_matrix(position_ids=position_ids[0]))
    expected = torch.zeros(9, 9, dtype=torch.bool)
    for start, end in ((0, 3), (3, 5), (5, 9)):
        expected[start:end, start:end] = torch.ones(end - start, end - start).tril().bool()
    assert torch.equal(mask[0, 0], expected)
    padding = torch.tensor([[1, 1, 1, 1, 0, 0]])
    mask = create_causal_mask(config, torch.zeros(1, 6, 4), padding, None, position_ids=torch.arange(6)[None])
    assert torch.equal(mask[0, 0], attention_matrix(attention_mask=padding[0]))


def _spread(order, lengths, batch_size):
    """Mean (longest - shortest) length inside a batch: the padding a batch carries."""
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    return sum(max(lengths[j] for j in b) - min(lengths[j] for j in b) for b in batches) / len(batches)


def test_length_grouped_sampler_is_deterministic_and_groups_lengths():
    lengths = torch.randint(10, 500, (400,), generator=torch.Generator().manual_seed(0)).tolist()
    sampler = LengthGroupedSampler(lengths, batch_size=4, seed=3)
    order = list(sampler)
    assert sorted(order) == list(range(400)) and len(sampler) == 400
    assert order == list(LengthGroupedSampler(lengths, batch_size=4, seed=3))
    assert order != list(LengthGroupedSampler(lengths, batch_size=4, seed=4))
    sampler.set_epoch(1)
    assert sorted(list(sampler)) == list(range(400)) and list(sampler) != order
    assert lengths[order[0]] == max(lengths)  # the longest batch comes first
    shuffled = torch.randperm(400, generator=torch.Generator().manual_seed(0)).tolist()
    assert _spread(order, lengths, 4) < _spread(shuffled, lengths, 4) / 4


def test_modality_grouped_sampler_keeps_text_only_apart():
    lengths = [(n if n % 3 else -n) for n in range(1, 101)]  # every third sample is text-only (negative)
    order = list(LengthGroupedSampler(lengths, batch_size=4, seed=0, group_by_modality=True))
    assert sorted(order) == list(range(100))
    batches = [order[i:i + 4] for i in range(0, 100, 4)]
    mixed = [k for k, b in enumerate(batches) if len({lengths[j] > 0 for j in b}) > 1]
    assert mixed == [len(batches) - 1]  # 67 image + 33 text-only samples: only the last batch mixes
    plain = list(LengthGroupedSampler(lengths, batch_size=4, seed=0))
    assert sum(len({lengths[j] > 0 for j in plain[i:i + 4]}) > 1 for i in range(0, 100, 4)) > 5


def test_one_trainer_step_gives_the_same_weights_padded_or_packed(items, empty_llava, tmp_path):
    """The training path, not only the forward: one HF Trainer step on the same mixed batch from the same
    weights, with each collator, must give the same loss, gradient norm and updated parameters. The step
    is SGD, so equal parameters mean equal gradients (AdamW's first step is lr * sign(g), which turns
    float noise in near-zero gradients into differences of a sizeable fraction of lr)."""
    import copy

    from transformers import Trainer, TrainingArguments

    _, model, processor = empty_llava
    pad = processor.tokenizer.pad_token_id
    lengths = [len(it["input_ids"]) for it in items]
    collators = {"padded": PaddedCollator(pad), "packed": PackedCollator(max_tokens=4 * 2048),
                 "packed rows": PackedCollator(max_tokens=4 * 2048, row_tokens=max(lengths) + min(lengths),
                                               pad_token_id=pad)}
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    after, logs = {}, {}
    for name, collator in collators.items():
        trained = copy.deepcopy(model)
        trained.config.text_config.use_cache = False  # as course_lib.train does
        args = TrainingArguments(output_dir=str(tmp_path / name), per_device_train_batch_size=4, max_steps=1,
                                 optim="sgd", learning_rate=0.1, remove_unused_columns=False, report_to=[],
                                 save_strategy="no", use_cpu=True, logging_steps=1, disable_tqdm=True, seed=0)
        trainer = Trainer(model=trained, args=args, train_dataset=items, data_collator=collator)
        trainer.train()
        assert trainer.state.global_step == 1
        logs[name] = trainer.state.log_history[0]
        after[name] = {k: v.detach() for k, v in trained.state_dict().items()}
    moved = max((after["padded"][k] - v).abs().max().item() for k, v in before.items())
    assert moved > 1e-3, moved  # the step did change the weights (measured: 5e-3)
    for name in ("packed", "packed rows"):
        assert abs(logs[name]["loss"] - logs["padded"]["loss"]) < 1e-5, (name, logs)
        assert abs(logs[name]["grad_norm"] - logs["padded"]["grad_norm"]) < 1e-4 * logs["padded"]["grad_norm"]
        diff = max((after[name][k] - after["padded"][k]).abs().max().item() for k in before)
        assert diff < 1e-6, (name, diff)  # measured: 6e-8, float resolution of the weights
