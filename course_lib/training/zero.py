"""ZeRO's memory arithmetic: what each GPU holds for the model's states, by stage, GPU count and train type."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

STAGE_TRAIN_TYPES = (("pretrain", "projector only (stage 1)"), ("use_lora", "use_lora"),
                     ("freeze_vision", "freeze_vision"), ("none", "none (full)"))


def zero_memory_gb(params: int, gpus: int, stage: int, trainable: int | None = None) -> float:
    """Model-state memory per GPU for mixed-precision Adam: 2 bytes of 16-bit weights for every parameter,
    and for each trainable one 2 bytes of gradient + 12 of optimizer state (fp32 master weights, momentum,
    variance), partitioned over `gpus` by ZeRO stage 0-3 (Rajbhandari et al. 2020, sec. 5). Frozen
    parameters have no gradients or optimizer states. Activations and buffers come on top."""
    trainable = params if trainable is None else trainable
    weights, grads, optim = 2 * params, 2 * trainable, 12 * trainable
    if stage >= 1:
        optim /= gpus
    if stage >= 2:
        grads /= gpus
    if stage >= 3:
        weights /= gpus
    return (weights + grads + optim) / 2 ** 30


def trainable_counts(build: Callable) -> dict[str, tuple[int, int]]:
    """{train type: (all parameters, trainable ones)} for stage 1 and the stage-2 train types, as
    `prepare_model` sets them (LoRA at the course's default rank), on the model `build()` returns
    (build it on the meta device: no memory)."""
    from course_lib.model.parameters import param_table
    from course_lib.training.trainable import prepare_model

    def count(model) -> tuple[int, int]:
        total = param_table(model)[-1]
        return total["total"], total["trainable"]

    model, counts = build(), {}
    for train_type in ("pretrain", "freeze_vision", "none"):  # the same model, unfrozen differently
        counts[train_type] = count(prepare_model(model, "pretrain" if train_type == "pretrain" else "finetune",
                                                 train_type))
    counts["use_lora"] = count(prepare_model(model, "finetune", "use_lora"))  # last: it wraps the model
    return {t: counts[t] for t, _ in STAGE_TRAIN_TYPES}


@contextmanager
def whole_parameters(params: Iterable[torch.nn.Parameter], modify: bool = False) -> Iterator[None]:
    """Inside the block, ZeRO-3-partitioned parameters are whole on every rank (ZeRO-3 keeps 1/N of each per
    rank, and an empty tensor in its place); a no-op for parameters that are not partitioned. With `modify`,
    what rank 0 writes into them is partitioned back to every rank on exit. Collective: every rank enters."""
    params = list(params)
    if not any(hasattr(p, "ds_id") for p in params):  # not ZeRO-3: no DeepSpeed import
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(params, modifier_rank=0 if modify else None):
        yield


def peak_memory_gib() -> dict[str, float]:
    """This process's memory, in GiB: `resident`, the OS's high-water mark (loading included; pages of a
    memory-mapped checkpoint count too), `private`, its anonymous memory now (Linux: what this rank holds
    alone, e.g. its weights, gradients and optimizer states after training) and, on a GPU, `cuda`, the most
    CUDA memory torch allocated. What ZeRO's stages change, per rank, measured."""
    import resource
    import sys

    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    peak = {"resident": kib / (2 ** 30 if sys.platform == "darwin" else 2 ** 20)}
    status = Path("/proc/self/status")
    if status.is_file():
        anon = [line.split()[1] for line in status.read_text().splitlines() if line.startswith("RssAnon:")]
        if anon:
            peak["private"] = int(anon[0]) / 2 ** 20  # kB
    if torch.cuda.is_available():
        peak["cuda"] = torch.cuda.max_memory_allocated() / 2 ** 30
    return peak
