"""ZeRO's memory arithmetic: what each GPU holds for the model states, by stage (Rajbhandari et al. 2020)."""

from __future__ import annotations


def zero_memory_gb(params: int, gpus: int, stage: int) -> float:
    """Model-state memory per GPU for mixed-precision Adam: 2 bytes weights + 2 grads + 12 optimizer
    (fp32 master weights, momentum, variance), partitioned over `gpus` by ZeRO stage 0-3 (Rajbhandari et
    al. 2020, sec. 5). Activations and buffers come on top."""
    weights, grads, optim = 2 * params, 2 * params, 12 * params
    if stage >= 1:
        optim /= gpus
    if stage >= 2:
        grads /= gpus
    if stage >= 3:
        weights /= gpus
    return (weights + grads + optim) / 2 ** 30
