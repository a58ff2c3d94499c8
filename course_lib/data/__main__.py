"""`python -m course_lib.data validate --data X.json [--images DIR]`: the data commands."""

from __future__ import annotations

import sys

from course_lib.data.validate import main as validate_main
from course_lib.util.cli import UserError, command


@command
def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] != ["validate"]:
        raise UserError("expected a command: python -m course_lib.data validate --data X.json [--images DIR]")
    return validate_main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
