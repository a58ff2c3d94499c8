"""Resuming a run never executes code from its checkpoint: every pickle is read weights-only.

transformers reads its own checkpoint files (`optimizer.pt`, `scheduler.pt`, `rng_state.pth`) with
`torch.load(weights_only=True)`. DeepSpeed 0.19 does not: its `TorchCheckpointEngine.load` and ZeRO-3's
universal-checkpoint readers call `torch.load(..., weights_only=False)` on
`global_step*/mp_rank_*_model_states.pt` and `*_optim_states.pt`, so a crafted checkpoint folder would run
any command on `--resume_from_checkpoint`. While training, `weights_only_loading()` makes every
`torch.load` weights-only (PyTorch's restricted unpickler: tensors, containers, numbers, strings), with the
few DeepSpeed classes a real ZeRO checkpoint holds allow-listed. Anything else in a pickle is refused with
one line naming the file and the object it tried to build.
"""

from __future__ import annotations

import pickle
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from course_lib.util.cli import UserError


class UnsafeCheckpointError(UserError):
    """A checkpoint file that holds more than weights and plain data."""


def deepspeed_checkpoint_types() -> list:
    """What a ZeRO-1/2/3 checkpoint pickles besides tensors and containers (found by loading real ones
    weights-only): loss scalers, the ZeRO stage enum, and the fragment addresses of flattened parameters."""
    try:
        from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
        from deepspeed.runtime.zero.config import ZeroStageEnum
        from deepspeed.utils.tensor_fragment import fragment_address
    except ImportError:  # no DeepSpeed installed: nothing of its to allow
        return []
    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def _refusal(path: object, err: Exception) -> str:
    # PyTorch's message is a paragraph; the line that says what the pickle tried to build is the one to keep.
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    what = next((line.rstrip(".") for line in lines if "nsupported" in line),
                lines[-1] if lines else type(err).__name__)
    return (f"{path}: refused to load: it holds a pickled object that is not weights or plain data ({what}); "
            "a checkpoint from an untrusted source can run code, so it is never unpickled in full")


@contextmanager
def weights_only_loading() -> Iterator[None]:
    """Within the block, `torch.load` is weights-only whatever its caller asked for."""
    original = torch.load

    def load(f, *args, weights_only=None, **kwargs):  # noqa: ARG001 -- the caller's choice is overridden
        with torch.serialization.safe_globals(deepspeed_checkpoint_types()):
            try:
                return original(f, *args, weights_only=True, **kwargs)
            except pickle.UnpicklingError as err:
                raise UnsafeCheckpointError(_refusal(f, err)) from None

    torch.load = load
    try:
        yield
    finally:
        torch.load = original
