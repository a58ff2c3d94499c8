"""The denominator of MFU: the dense matmul rate this device reaches, measured now, by dtype.

`course_lib.lessons.speed` divides its useful FLOPs by the best of these rates.
"""

from __future__ import annotations

import torch
from torch.utils.benchmark import Timer


def matmul_rate(device: str, dtype: torch.dtype, n: int = 4096, repeats: int = 5) -> float:
    """Measured dense matmul FLOP/s of n x n products on this device and dtype."""
    n = max(n, 8192) if device.startswith("cuda") else n  # a GPU reaches its matmul peak only at large sizes
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    # torch's Timer synchronises CUDA and picks how many products to time; it uses 1 thread unless told.
    timer = Timer("a @ b", globals={"a": a, "b": b}, num_threads=torch.get_num_threads())
    return 2 * n ** 3 / timer.blocked_autorange(min_run_time=0.2 * repeats).median


def native_bf16() -> bool:
    """Whether this CPU multiplies bf16 in hardware (AMX or AVX512-BF16), as oneDNN reports it."""
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def peak_rates(device: str, dtype: torch.dtype) -> dict[str, float]:
    """The matmul rates MFU is measured against, by dtype name: the denominator is their maximum.

    On a GPU, the training dtype's rate. On a CPU, fp32 and bf16 both, each the best of 1024 and 4096
    squared (caches favour one or the other): a CPU with AMX multiplies bf16 several times faster than
    fp32, so the fp32 rate alone would make an fp32 run look efficient while most of the chip idles. A CPU
    without native bf16 emulates it at a small fraction of its fp32 rate (1.3 GFLOP/s against 132 on the
    2-core AMD EPYC this was written on), so there bf16 is timed at 512 only, to show the gap in a second.
    """
    if device.startswith("cuda"):
        return {str(dtype).replace("torch.", ""): matmul_rate(device, dtype)}
    sizes = (1024, 4096) if native_bf16() else (512,)
    return {"float32": max(matmul_rate(device, torch.float32, n) for n in (1024, 4096)),
            "bfloat16": max(matmul_rate(device, torch.bfloat16, n) for n in sizes)}
