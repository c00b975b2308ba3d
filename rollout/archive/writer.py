"""Writing the rollout archive: Arrow IPC stream files of schema v2 (`contracts.schema.archive_schema`),
written as samples complete.

Writing happens on a background thread so generation never waits on the disk; every record batch
is flushed when written, so a crash loses at most the batch in flight. Files are never reopened
for writing: a resumed run starts a new file after the last one (`rollout/archive/reader.py` reads them).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

import pyarrow as pa

from contracts.errors import JobFailure
from contracts.schema import (
    SCHEMA_VERSION,
    RolloutRecord,
    archive_schema,
    to_record_batch,
)

FILE_PATTERN = "part-{:05d}.arrow"
_CLOSE = object()


class ArchiveWriteError(JobFailure, OSError):
    """Writing the archive failed (a full disk, a read-only or failing device); the message names the file."""


class ArchiveWriter:
    """Streams records to `directory/part-NNNNN.arrow`, rolling to a new file every `rows_per_file`.

    `components` are the run's reward components: the fields of the `reward_components` struct.

    `write` only enqueues; a daemon thread converts and writes `batch_rows`-sized record batches.
    Errors on that thread surface on the next `write`, `flush` or `close`.
    """

    def __init__(
        self,
        directory: str | Path,
        metadata: dict[str, str],
        components: Sequence[str],
        *,
        batch_rows: int = 256,
        rows_per_file: int = 100_000,
        max_pending: int = 64,
    ):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.components = tuple(components)
        self.schema = archive_schema(self.components).with_metadata({**metadata, "schema_version": str(SCHEMA_VERSION)})
        self.batch_rows = batch_rows
        self.rows_per_file = rows_per_file
        self._next_file = _next_file_index(self.directory)
        self._file_rows = 0
        self._sink: pa.NativeFile | None = None
        self._path: Path | None = None
        self._writer: pa.ipc.RecordBatchStreamWriter | None = None
        self._pending: list[RolloutRecord] = []
        self._queue: queue.Queue = queue.Queue(maxsize=max_pending)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="archive-writer", daemon=True)
        self._thread.start()

    def write(self, records: list[RolloutRecord]) -> None:
        """Queue records for writing; returns at once unless the queue is full (back-pressure)."""
        self._raise_if_failed()
        if records:
            self._queue.put(list(records))

    def write_batch(self, batch: pa.RecordBatch) -> None:
        """Queue a ready batch of the archive's schema (replay's path): no round trip through records."""
        self._raise_if_failed()
        self._check_schema(batch)
        if batch.num_rows:
            self._queue.put(batch)

    def _check_schema(self, batch: pa.RecordBatch) -> None:
        if not batch.schema.remove_metadata().equals(self.schema.remove_metadata()):
            raise ValueError(
                f"batch schema differs from the archive schema v{SCHEMA_VERSION} of components "
                f"{list(self.components)}:\n{batch.schema.remove_metadata()}"
            )

    def write_later(self, produce: Callable[[], list[pa.RecordBatch]]) -> None:
        """Queue a function that returns ready batches of the archive's schema; the writer thread calls it, so
        fetching and joining the columns happens off the caller's path too."""
        self._raise_if_failed()
        self._queue.put(produce)

    def flush(self) -> None:
        """Block until everything queued so far is on disk."""
        done = threading.Event()
        self._queue.put(done)
        done.wait()
        self._raise_if_failed()

    def close(self) -> None:
        """Write what is queued and close the file; the writer thread always ends, failed or not."""
        if self._thread.is_alive():
            self._queue.put(_CLOSE)
            self._thread.join()
        self._raise_if_failed()

    def __enter__(self) -> ArchiveWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _raise_if_failed(self) -> None:
        error = self._error
        if error is None:
            return
        if isinstance(error, OSError):
            where = error.filename or self._path or self.directory
            raise ArchiveWriteError(
                error.errno, f"archive write to {where} failed: {error.strerror or error}"
            ) from error
        raise RuntimeError(f"archive writer in {self.directory} failed: {error}") from error

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is _CLOSE:
                try:
                    if self._error is None:
                        self._write_pending(final=True)
                    self._close_file()
                except BaseException as e:  # noqa: BLE001 - reported by close()
                    self._error = self._error or e
                return
            try:
                if isinstance(item, threading.Event):
                    if self._error is None:
                        self._write_pending(final=True)
                    item.set()
                    continue
                if self._error is None and callable(item):
                    self._write_pending(final=True)  # keep rows in the order they were queued
                    for batch in item():
                        self._check_schema(batch)
                        self._write_arrow(batch)
                elif self._error is None and isinstance(item, pa.RecordBatch):
                    self._write_pending(final=True)
                    self._write_arrow(item)
                elif self._error is None:
                    self._pending.extend(item)
                    self._write_pending(final=False)
            except BaseException as e:  # noqa: BLE001 - reported to the producer, not lost
                self._error = self._error or e
                if isinstance(item, threading.Event):
                    item.set()

    def _write_pending(self, *, final: bool) -> None:
        while self._pending and (final or len(self._pending) >= self.batch_rows):
            room = self.rows_per_file - self._file_rows
            take = min(self.batch_rows, room, len(self._pending))
            chunk, self._pending = self._pending[:take], self._pending[take:]
            self._write_batch(to_record_batch(chunk, self.components))

    def _write_arrow(self, batch: pa.RecordBatch) -> None:
        """A ready batch, split at the batch and file sizes like queued records."""
        start = 0
        while start < batch.num_rows:
            take = min(self.batch_rows, self.rows_per_file - self._file_rows, batch.num_rows - start)
            self._write_batch(batch.slice(start, take))
            start += take

    def _write_batch(self, batch: pa.RecordBatch) -> None:
        if self._writer is None:
            path = self.directory / FILE_PATTERN.format(self._next_file)
            self._next_file += 1
            self._path = path
            self._sink = pa.OSFile(str(path), "wb")
            self._writer = pa.ipc.new_stream(self._sink, self.schema)
        self._writer.write_batch(batch.replace_schema_metadata(self.schema.metadata))
        self._sink.flush()
        self._file_rows += batch.num_rows
        if self._file_rows >= self.rows_per_file:
            self._close_file()

    def _close_file(self) -> None:
        """End the file's stream; after a failed write only the file is closed (its batches are whole)."""
        writer, sink = self._writer, self._sink
        self._writer, self._sink, self._file_rows = None, None, 0
        try:
            if writer is not None and self._error is None:
                writer.close()
        finally:
            if sink is not None:
                sink.close()


def _next_file_index(directory: Path) -> int:
    indices = [int(p.stem.split("-")[1]) for p in directory.glob("part-*.arrow")]
    return max(indices, default=-1) + 1
