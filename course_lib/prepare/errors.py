"""The two ways preparation reports a problem: stop with one line for people, or skip one record."""

from __future__ import annotations

from course_lib.util.cli import UserError


class InputError(UserError):
    """A problem with what the user passed in (a missing file, a bad archive): one `error:` line, exit 2."""


class SkipRecord(Exception):
    """One source record cannot be used; `reason` is the key counted in the summary, `detail` says why."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(reason)
        self.reason = reason
        self.detail = detail or reason
