"""How a command that failed is reported: its exit code and one line naming what failed.

The codes follow the two bases of `contracts.errors`, by type: 2 for a `UserError` (fix what you passed:
files, data, options), 1 for a `JobFailure` (the job failed on its way: actors, timeouts, disks). An
error an actor's own code raised is judged by what it raised (`ActorRaised.cause`, or Ray's
`RayTaskError.cause`); anything else raised there is an error of the job. Python's own errors map as
their meaning says (a missing file is the user's, a full disk the job's); any other exception is a bug,
and the command shows its traceback.
"""

from __future__ import annotations

import sys

from contracts.errors import JobFailure, UserError, first_line
from rollout.runtime.failures import ActorRaised

# Python's own errors that mean a path the user passed is wrong.
USER_OS_ERRORS = (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError)


def exit_code(error: BaseException) -> int | None:
    """2 for what the user must fix, 1 for a job that failed on its way; None for a bug (traceback)."""
    cause = _cause(error)
    if isinstance(cause, (UserError, *USER_OS_ERRORS)):
        return 2
    if isinstance(cause, (JobFailure, OSError)) or cause is not error:
        return 1  # the job's failure, a full or failing disk, or whatever an actor's code raised
    exceptions = sys.modules.get("ray.exceptions")  # not imported: no actor ran
    if exceptions and isinstance(error, exceptions.RayError):  # an actor gone, an object lost
        return 1
    return None


def one_line(error: BaseException) -> str:
    """The failure in one line: an actor's error named with the actor, anything else its own first line."""
    if isinstance(error, ActorRaised):
        return str(error)
    cause = _cause(error)
    if cause is not error:  # raised in an actor, but not by way of a group that names it
        return f"an actor raised {type(cause).__name__}: {first_line(cause)}"
    return first_line(error)


def _cause(error: BaseException) -> BaseException:
    """An actor's error as raised there, not the wrapper that carried it here."""
    exceptions = sys.modules.get("ray.exceptions")
    while True:
        if isinstance(error, ActorRaised):
            error = error.cause
        elif exceptions and isinstance(error, exceptions.RayTaskError) and error.cause is not None:
            error = error.cause
        else:
            return error
