"""`rollout run` as two processes: the job, and a small parent that says how it ended when it could not.

Some ends leave the job's process no time to report: Ray ends a driver whose raylet died with its
own dump and exit code 1, the kernel's OOM killer sends SIGKILL. The parent, which imports nothing
of the job, waits for the job, and when the job exits without having said it finished, prints the
one line the job could not (how it ended, that finished iterations are archived, that the same
command resumes) and exits non-zero.

A job that did report its end leaves its closing line for the parent to print after it, so that line
is the last one a user sees even when Ray's threads log while the job's process exits.

The job runs in a process group of its own, so a signal sent to the parent's group (Ctrl-C at a
terminal, `ray job stop`, `kill`) reaches the job once, forwarded by the parent, never twice (a
second signal would skip the job's clean stop).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

FINISHED_FILE_ENV = "ROLLOUT_FINISHED_FILE"  # set in the job: where it writes that it finished
FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
_last_line: list[str] = []  # the job's closing line, held for the parent to print


def supervised() -> bool:
    """True in the job process (the parent started it)."""
    return FINISHED_FILE_ENV in os.environ


def say_last(line: str) -> None:
    """The command's closing line (how it failed or stopped). In the job the parent prints it once the
    job's process is gone, so nothing Ray's threads print while the process exits comes after it."""
    if supervised():
        _last_line[:] = [line]
    else:
        print(line, file=sys.stderr, flush=True)


def mark_finished() -> None:
    """The job's last act, whatever its exit code: it reported its end itself (with its closing line)."""
    path = os.environ.get(FINISHED_FILE_ENV)
    if path:
        Path(path).write_text("\n".join(["finished", *_last_line]))


def supervise(argv: list[str]) -> int:
    """Run `python -m rollout ARGV` as the job; its exit code, or one line and 1 / 128 + signal."""
    with tempfile.TemporaryDirectory(prefix="rollout-run-") as tmp:
        finished = Path(tmp) / "finished"
        env = {**os.environ, FINISHED_FILE_ENV: str(finished)}
        job = subprocess.Popen([sys.executable, "-m", "rollout", *argv], env=env, process_group=0)
        for signum in FORWARDED:
            signal.signal(signum, lambda received, _frame: job.send_signal(received))
        code = job.wait()
        if finished.exists():
            _, _, closing = finished.read_text().partition("\n")
            if closing:
                print(closing, file=sys.stderr, flush=True)
            return code
    how = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
    print(
        f"rollout run: the job's process ended before it could report ({how}, pid {job.pid}); the lines above "
        "say why (a raylet or node that died, the OOM killer). Every finished iteration is archived; "
        "the same command resumes from the newest checkpoint",
        file=sys.stderr,
        flush=True,
    )
    return 128 - code if code < 0 else 1
