"""One error boundary for every command: a mistake in what the user typed or supplied is one `error:` line.

Every `python -m course_lib.X` entry point is wrapped by `command`:

* a `UserError` (bad flag, missing file, broken JSON, unusable sample, unsafe checkpoint...) prints
  `error: <its message>`, which names the file, flag or sample and what was expected; exit code 2;
* an `OSError` a user causes (no such file, permission denied, a path under a file, disk full) prints the
  path and the system's reason; exit code 2;
* running out of memory says so and what to lower; exit code 2;
* anything else is a bug in our code: one line with its type, and how to see the traceback; exit code 1;
* Ctrl-C prints nothing more than a newline; exit code 130.

`COURSE_LIB_DEBUG=1` lets every exception through with its full traceback, for developers. (It is an
environment variable, not a `--debug` flag, because Hugging Face's `TrainingArguments` already owns
`--debug`, and the same switch must work for every command.)

Argument parsers are `Parser`s: argparse's own mistakes (`--limit abc`) are one line too, not its
usage block.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
from collections.abc import Callable

DEBUG_ENV = "COURSE_LIB_DEBUG"
USER_ERROR, BUG, INTERRUPTED = 2, 1, 130


class UserError(Exception):
    """Something the user passed in is wrong; the message names it and says what was expected."""


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors: `error: argument --limit: invalid int value: 'abc' (see --help)`."""

    def error(self, message: str):  # argparse's hook; it must not return
        print(f"error: {message} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(USER_ERROR)


def first_line(err: BaseException) -> str:
    """An exception's first line of text, or its type's name when it has none: for one-line errors."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def describe(err: BaseException) -> tuple[str, int]:
    """(one line for the user, exit code) for an exception that escaped a command."""
    import torch

    if isinstance(err, UserError):
        return first_line(err), USER_ERROR
    if isinstance(err, (MemoryError, torch.OutOfMemoryError)):
        return ("out of memory: lower --per_device_train_batch_size or --model_max_length, or use a machine "
                f"with more memory ({first_line(err)})"), USER_ERROR
    if isinstance(err, OSError) and (err.filename or err.strerror):
        where = f"{err.filename}: " if err.filename else ""
        return f"{where}{err.strerror or first_line(err)}", USER_ERROR
    return (f"unexpected {type(err).__name__}: {first_line(err)} (this is a bug in course_lib; "
            f"rerun with {DEBUG_ENV}=1 for the traceback)"), BUG


def run_guarded(body: Callable[[], int | None]) -> int:
    """Run `body`, turning any escaping exception into one `error:` line and an exit code."""
    try:
        return body() or 0
    except SystemExit as done:  # argparse after --help or a one-line error: the same code, returned
        return done.code if isinstance(done.code, int) else USER_ERROR
    except KeyboardInterrupt:
        if os.environ.get(DEBUG_ENV):
            raise
        print(file=sys.stderr)
        return INTERRUPTED
    except Exception as err:  # noqa: BLE001 -- the boundary: every failure becomes one line
        if os.environ.get(DEBUG_ENV):
            raise
        line, code = describe(err)
        print(f"error: {line}", file=sys.stderr, flush=True)
        return code


def command(main: Callable[..., int | None]) -> Callable[..., int]:
    """Wrap a command's `main(argv=None)` in the error boundary."""

    @functools.wraps(main)
    def guarded(argv: list[str] | None = None) -> int:
        return run_guarded(lambda: main(argv))

    return guarded
