"""SIGTERM and SIGINT (Ctrl-C, `ray job stop`) stop a job cleanly instead of killing it mid-write.

The handler raises `JobStopped` in the main thread: the job loop unwinds through `Session.close`,
which writes the archive's queued iterations and releases the actors, and the command exits with
128 + the signal number (143 for SIGTERM, 130 for SIGINT) after one line saying so. A second
signal while that runs is not intercepted again, so a user who insists still gets the default.
Ray installs its own SIGTERM handler in the driver when it starts, so `install` runs again after
`ray.init`.
"""

from __future__ import annotations

import signal

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class JobStopped(BaseException):
    """Raised by a stop signal; a BaseException, like KeyboardInterrupt, so `except Exception` passes it on."""

    def __init__(self, signum: int):
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def stop_behind(error: BaseException) -> JobStopped | None:
    """The JobStopped an error was raised while handling, if any. A signal that lands inside a C call
    of Ray's (`ray.wait`) comes out as that call's SystemError, with the JobStopped as its context."""
    seen = error
    while seen is not None:
        if isinstance(seen, JobStopped):
            return seen
        seen = seen.__context__
    return None


def _raise(signum, frame) -> None:
    for s in SIGNALS:  # a second signal during the clean stop gets the default behaviour
        signal.signal(s, signal.SIG_DFL)
    raise JobStopped(signum)


def install() -> None:
    """Turn stop signals into JobStopped (main thread only; a no-op elsewhere)."""
    try:
        for s in SIGNALS:
            signal.signal(s, _raise)
    except ValueError:  # not the main thread: nothing to stop from here
        pass
