"""The command-line convention shared by every command: bad input is one `error: ...` line and exit code 1
(`errors.fail`), a usage mistake exit code 2 (argparse), `--help` exit code 0 — absl commands included (absl's
help flag exits 1)."""

from __future__ import annotations

import sys
from collections.abc import Callable

from absl import app

HELP_FLAGS = ("--help", "-h", "-?", "--helpshort", "--helpfull", "--helpxml")


def run_absl(main: Callable, flags_parser: Callable | None = None) -> None:
    """`absl.app.run(main)` with the exit code of `--help` made 0, like the argparse commands."""
    try:
        if flags_parser is None:
            app.run(main)
        else:
            app.run(main, flags_parser=flags_parser)
    except SystemExit as e:
        if e.code == 1 and any(a in HELP_FLAGS for a in sys.argv[1:]):
            sys.exit(0)
        raise
