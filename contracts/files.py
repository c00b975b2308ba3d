"""Small files of a run (its manifest, metrics, checkpoint lists), written so that a reader or a crash finds
the old text or the new, and so that a failed write (a full disk) names its file: a bare `write` reports
only "[Errno 28] No space left on device"."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path


@contextlib.contextmanager
def naming(path: Path):
    """An OSError inside, given `path` as its file name where it has none."""
    try:
        yield
    except OSError as e:
        if e.filename is not None:
            raise
        raise OSError(e.errno, e.strerror or str(e), str(path)) from e


def write_atomically(path: Path, text: str) -> None:
    """`text` as the whole of `path`: written beside it, then renamed over it."""
    temporary = path.with_name(path.name + ".tmp")
    with naming(path):
        try:
            temporary.write_text(text, encoding="utf-8")
            os.replace(temporary, path)
        except OSError:
            temporary.unlink(missing_ok=True)
            raise


def append_text(path: Path, text: str) -> None:
    with naming(path), path.open("a", encoding="utf-8") as f:
        f.write(text)
