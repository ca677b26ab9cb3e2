"""The project's own failure types, and the set every CLI turns into a one-line `error: ...` (exit code 1).

Bad input raises the builtin ValueError / FileNotFoundError / FileExistsError (see the project's code rules); a
run that cannot go on raises one of the `Error` subclasses below. Every message names the problem and the fix.
"""

from __future__ import annotations

import sys


class Error(Exception):
    """Base of the failures that are not bad input: the run stops, the message says what to do."""


class TrainingStopped(Error):
    """The run cannot continue (non-finite updates or parameters); the message names the last good checkpoint."""


class CheckpointError(Error):
    """A save failed or was not confirmed, or no checkpoint reads back; the message names the last committed step."""


class WorkdirLocked(Error):
    """Another run holds the workdir (the message names its host and pid)."""


# What a CLI catches at the top: bad input (ValueError, OSError incl. FileNotFoundError / FileExistsError /
# PermissionError / a full disk) and the project's own errors. Anything else is a bug and keeps its traceback.
CLI_ERRORS = (ValueError, OSError, Error)


def fail(e: BaseException) -> int:
    """Print `error: <e>` on stderr (one line per message line) and return the exit code 1."""
    print(f"error: {e}", file=sys.stderr, flush=True)
    return 1
