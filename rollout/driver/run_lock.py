"""One run per directory: `RUN_DIR/.lock`, held (flock) for as long as a run or `generate` writes there.

The kernel releases the lock when its holder exits, however it exits, so a lock is never stale in
the kernel's eyes; the file's text (host, pid, command, start time) is what a refused second run
prints, and what a new holder reports as the previous one when that one ended without releasing
(a crash, SIGKILL).
"""

from __future__ import annotations

import datetime as dt
import fcntl
import json
import os
import platform
import sys
from pathlib import Path

from contracts.errors import UserError

LOCK = ".lock"


class RunDirBusy(UserError):
    """Another live process holds the run directory; the message names it."""


class RunLock:
    def __init__(self, run_dir: Path, fd: int, previous: dict | None):
        self.path = Path(run_dir) / LOCK
        self._fd: int | None = fd
        self.previous = previous  # the holder before us that ended without releasing, if any

    @classmethod
    def acquire(cls, run_dir: Path) -> RunLock:
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        path = run_dir / LOCK
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read(fd)
            os.close(fd)
            raise RunDirBusy(
                f"{run_dir} is in use by {_describe(holder)}; wait for that run to end, stop it, or pass another --out"
            ) from None
        previous = _read(fd)
        me = {
            "host": platform.node(),
            "pid": os.getpid(),
            "command": " ".join(sys.argv),
            "since": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(me) + "\n").encode(), 0)
        return cls(run_dir, fd, previous or None)

    def release(self) -> None:
        """Unlock and clear the holder's text; a later run finds a free, empty lock."""
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def stale_warning(self) -> str | None:
        if not self.previous:
            return None
        return (
            f"warning: took over the lock of {self.path.parent} from {_describe(self.previous)}, which "
            "ended without releasing it (a crash or a kill)"
        )


def _read(fd: int) -> dict:
    text = os.pread(fd, 4096, 0).decode(errors="replace").strip()
    if not text:
        return {}
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return {"text": text}


def _describe(holder: dict) -> str:
    if "pid" not in holder:
        return "another process"
    return (
        f"pid {holder['pid']} on {holder.get('host', '?')} (since {holder.get('since', '?')}: "
        f"{holder.get('command', '?')})"
    )
