"""Silencing transformers' load reports and progress bars where the course prints its own one line."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator


@contextlib.contextmanager
def quiet_transformers(progress_bars: bool = True) -> Iterator[None]:
    """No load reports (e.g. the CLIP text keys a vision-only load skips); with `progress_bars=False`,
    no 'Loading weights' bars either. Restores the previous verbosity and bars on exit."""
    from transformers.utils import logging

    level, bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    if not progress_bars:
        logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            yield
    finally:
        logging.set_verbosity(level)
        if bars and not progress_bars:
            logging.enable_progress_bar()
