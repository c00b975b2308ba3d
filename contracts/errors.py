"""The project's two kinds of error. Every error class of every package derives from one of them, and the
command line maps them to exit codes in one place (`rollout.errors`):

- `UserError` (exit 2): what the user must fix in what they passed: a config, a data file, an option,
  a run directory or storage they pointed at. The message names the file, line, field or option.
- `JobFailure` (exit 1): a job that failed on its way: an actor that died for good or hung, a timeout, a
  full disk, non-finite numbers. The message names what failed and the setting that bounds it.

Errors of Python's own (a missing file, a full disk) keep their classes; `rollout.errors` maps those too.
"""

from __future__ import annotations


class UserError(Exception):
    """Fix what was passed (config, data, options, paths) and run the same command again: exit 2."""


class JobFailure(Exception):
    """The job failed on its way (actors, timeouts, disks, numbers); the same command resumes: exit 1."""


def first_line(error: BaseException) -> str:
    """An error's message on one line, as a console line or a metric quotes it (its class where it has none)."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
