"""The speed benchmark's parts: real-size geometries, packing of the benchmark pool, the CLI's errors."""

import subprocess
import sys

import pytest
import torch

from course_lib.data.image_tokens import num_image_tokens
from course_lib.lessons import speed


@pytest.mark.parametrize("name, lm_params", [("qwen2.5-0.5b", 494.0e6), ("qwen2.5-1.5b", 1543.7e6)])
def test_real_geometries_have_the_published_sizes(name, lm_params):
    """Qwen2.5-0.5B has 494.0M parameters and 1.5B 1543.7M (their model cards); CLIP-L/14's tower 303.2M."""
    model = speed.build_model(speed.GEOMETRIES[name], device="meta")
    lm = sum(p.numel() for p in model.model.language_model.parameters())
    vision = sum(p.numel() for p in model.model.vision_tower.parameters())
    assert abs(lm - lm_params) / lm_params < 0.002, lm
    assert abs(vision - 303.2e6) / 303.2e6 < 0.005, vision
    assert num_image_tokens(speed.GEOMETRIES[name].vision) == 576


def test_benchmark_pool_packs_almost_without_padding():
    geometry = speed.GEOMETRIES["tiny"]
    items = speed.make_samples(geometry, 96, seed=0)
    lengths = [len(it["input_ids"]) for it in items]
    assert max(lengths) <= geometry.row_tokens
    kinds = {it["id"].split("-")[0] for it in items}
    assert kinds == {"caption", "conversation", "text"}
    steps = speed.packed_batches(items, geometry.row_tokens, rows_per_step=3, seed=0)
    assert sorted(i for s in steps for i in s) == list(range(len(items)))
    computed = real = 0
    from course_lib.data.collators import PackedCollator

    for step in steps:
        batch = PackedCollator(10 ** 9, row_tokens=geometry.row_tokens)([items[i] for i in step])
        computed += batch["input_ids"].numel()
        real += sum(lengths[i] for i in step)
        assert batch["input_ids"].shape[0] <= 3
        images = sum(0 if items[i].get("pixel_values") is None else len(items[i]["pixel_values"]) for i in step)
        image_id = geometry.text["vocab_size"] - 1
        assert (batch["input_ids"] == image_id).sum() == images * num_image_tokens(geometry.vision)
    assert real / computed >= 0.95
    # The reference batches of the same pool are mostly padding.
    ref = speed.reference_batches(items, 8, seed=0)
    ref_computed = sum(len(b) * max(lengths[i] for i in b) for b in ref)
    assert real / ref_computed < 0.6


def test_one_training_pass_counts_tokens():
    geometry = speed.GEOMETRIES["tiny"]
    model = speed.build_model(geometry)
    items = speed.make_samples(geometry, 6, seed=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    mode = speed.Mode("padded", speed.PaddedCollator(0), [[0, 1, 2], [3, 4, 5]])
    result = speed.train_pass(model, opt, items, mode, "cpu", torch.float32)
    assert result["steps"] == 2 and result["real_tokens"] == sum(len(it["input_ids"]) for it in items)
    widths = [max(len(items[i]["input_ids"]) for i in b) for b in mode.batches]
    assert result["computed_tokens"] == 3 * sum(widths)


def test_cli_refuses_cuda_without_a_gpu():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    run = subprocess.run([sys.executable, "-m", "benchmarks.packing", "--device", "cuda"],
                         capture_output=True, text=True)
    assert run.returncode == 2 and "no CUDA device here" in run.stderr and "Traceback" not in run.stderr


def test_per_sample_attention_in_packed_rows_is_exactly_sdpa_with_the_block_mask():
    """sdpa_packed splits each packed row at its samples and attends within each: loss, logits and every
    gradient must be SDPA's with transformers' dense block-diagonal mask, one flat row and rows of 1024 alike;
    a padded batch (no split) falls through to SDPA. The blocks of rows are read off the mask itself; one
    flat row's come from the collator's `cu_seq_lens_q`."""
    from course_lib.data.collators import PackedCollator, PaddedCollator, ReferenceCollator
    from course_lib.model.packed_attention import NAME, diagonal_blocks

    mask = torch.ones(7, 7, dtype=torch.bool).tril()
    mask[3:, :3] = False
    assert diagonal_blocks(mask, min_block=1) == [(0, 3), (3, 7)]
    assert diagonal_blocks(mask) == [(0, 7)]  # short blocks join their neighbour (left padding: one per token)
    mask[5, 1] = True  # one query that looks back across the cut: no split there
    assert diagonal_blocks(mask, min_block=1) == [(0, 7)]

    geometry = speed.GEOMETRIES["tiny"]
    items = speed.make_samples(geometry, 8, seed=1)
    for collator in (PackedCollator(10 ** 9), PackedCollator(10 ** 9, row_tokens=1024), PaddedCollator(0),
                     ReferenceCollator(0)):
        batch = collator(items)
        runs = []
        for attn in ("sdpa", NAME):
            model = speed.build_model(geometry, attn=attn, seed=0)
            out = model(**batch)
            out.loss.backward()
            runs.append((out.loss, out.logits, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
        (loss, logits, grads), (loss2, logits2, grads2) = runs
        assert torch.allclose(loss, loss2, atol=1e-6) and torch.allclose(logits, logits2, atol=1e-5)
        assert grads.keys() == grads2.keys() and all(torch.allclose(grads[k], grads2[k], atol=1e-6) for k in grads)
