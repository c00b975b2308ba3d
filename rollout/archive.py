"""The rollout archive: Arrow IPC stream files of `ARCHIVE_SCHEMA`, written as samples complete.

Writing happens on a background thread so generation never waits on the disk; every record batch
is flushed when written, so a crash loses at most the batch in flight. Files are never reopened
for writing: a resumed run starts a new file after the last one. Reading tolerates a file cut
mid-batch (a crash): it yields every complete batch and warns about the rest.
"""

from __future__ import annotations

import queue
import threading
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from rollout.record import ARCHIVE_SCHEMA, SCHEMA_VERSION, RolloutRecord, to_record_batch

FILE_PATTERN = "part-{:05d}.arrow"
_CLOSE = object()


class ArchiveCutWarning(UserWarning):
    """An archive file ended mid-batch; the complete batches before the cut were read."""


class ArchiveWriter:
    """Streams records to `directory/part-NNNNN.arrow`, rolling to a new file every `rows_per_file`.

    `write` only enqueues; a daemon thread converts and writes `batch_rows`-sized record batches.
    Errors on that thread surface on the next `write`, `flush` or `close`.
    """

    def __init__(self, directory: str | Path, metadata: dict[str, str], *, batch_rows: int = 256,
                 rows_per_file: int = 100_000, max_pending: int = 64):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.schema = ARCHIVE_SCHEMA.with_metadata({"schema_version": str(SCHEMA_VERSION), **metadata})
        self.batch_rows = batch_rows
        self.rows_per_file = rows_per_file
        self._next_file = _next_file_index(self.directory)
        self._file_rows = 0
        self._sink: pa.NativeFile | None = None
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
        """Queue a ready batch of ARCHIVE_SCHEMA (replay's path): no round trip through records."""
        self._raise_if_failed()
        self._check_schema(batch)
        if batch.num_rows:
            self._queue.put(batch)

    @staticmethod
    def _check_schema(batch: pa.RecordBatch) -> None:
        if not batch.schema.remove_metadata().equals(ARCHIVE_SCHEMA):
            raise ValueError(f"batch schema differs from the archive schema v{SCHEMA_VERSION}")

    def write_later(self, produce: Callable[[], list[pa.RecordBatch]]) -> None:
        """Queue a function that returns ready ARCHIVE_SCHEMA batches; the writer thread calls it, so
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
        if self._thread.is_alive():
            self._queue.put(_CLOSE)
            self._thread.join()
        self._raise_if_failed()

    def __enter__(self) -> ArchiveWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise RuntimeError(f"archive writer in {self.directory} failed: {self._error}") from self._error

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is _CLOSE:
                    self._write_pending(final=True)
                    self._close_file()
                    return
                if isinstance(item, threading.Event):
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
                self._error = e
                if isinstance(item, threading.Event):
                    item.set()

    def _write_pending(self, *, final: bool) -> None:
        while self._pending and (final or len(self._pending) >= self.batch_rows):
            room = self.rows_per_file - self._file_rows
            take = min(self.batch_rows, room, len(self._pending))
            chunk, self._pending = self._pending[:take], self._pending[take:]
            self._write_batch(to_record_batch(chunk))

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
            self._sink = pa.OSFile(str(path), "wb")
            self._writer = pa.ipc.new_stream(self._sink, self.schema)
        self._writer.write_batch(batch.replace_schema_metadata(self.schema.metadata))
        self._sink.flush()
        self._file_rows += batch.num_rows
        if self._file_rows >= self.rows_per_file:
            self._close_file()

    def _close_file(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._sink.close()
        self._writer, self._sink, self._file_rows = None, None, 0


def _next_file_index(directory: Path) -> int:
    indices = [int(p.stem.split("-")[1]) for p in directory.glob("part-*.arrow")]
    return max(indices, default=-1) + 1


def archive_files(path: str | Path) -> list[Path]:
    """The archive files of a run directory, a `rollouts/` directory, or a single file, in order."""
    path = Path(path)
    if path.is_file():
        return [path]
    if (path / "rollouts").is_dir():
        path = path / "rollouts"
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no archive here (expected a run directory, rollouts/ or an .arrow file)")
    files = sorted(path.glob("part-*.arrow"))
    if not files:
        raise FileNotFoundError(f"{path}: no part-*.arrow files")
    return files


def iter_batches(path: str | Path, columns: list[str] | None = None) -> Iterator[pa.RecordBatch]:
    """Every complete record batch of an archive, across its files; a cut file warns and stops there."""
    for file in archive_files(path):
        with pa.memory_map(str(file)) as source:
            try:
                reader = pa.ipc.open_stream(source)
            except (pa.ArrowInvalid, OSError) as e:
                warnings.warn(f"{file}: unreadable header ({e}); skipped", ArchiveCutWarning, stacklevel=2)
                continue
            while True:
                try:
                    batch = reader.read_next_batch()
                except StopIteration:
                    break
                except (pa.ArrowInvalid, OSError) as e:
                    warnings.warn(f"{file}: cut mid-batch ({e}); read up to its last complete batch",
                                  ArchiveCutWarning, stacklevel=2)
                    break
                yield batch.select(columns) if columns else batch


def read_table(path: str | Path, columns: list[str] | None = None) -> pa.Table:
    """The whole archive as one table (columns selectable, to keep replay and stats lean)."""
    schema = ARCHIVE_SCHEMA if columns is None else pa.schema([ARCHIVE_SCHEMA.field(c) for c in columns])
    batches = [b.replace_schema_metadata(None) for b in iter_batches(path, columns)]
    return pa.Table.from_batches(batches, schema=schema).replace_schema_metadata(read_metadata(path))


def last_archived_iteration(run_dir: str | Path) -> int:
    """The highest iteration already in a run's archive, or -1."""
    try:
        archive_files(run_dir)
    except FileNotFoundError:
        return -1
    table = read_table(run_dir, columns=["iteration"])
    return -1 if table.num_rows == 0 else int(pc.max(table["iteration"]).as_py())


def read_metadata(path: str | Path) -> dict[str, str]:
    """The schema metadata of the archive's first file (run settings: gamma, lam, KL, model, config)."""
    with pa.memory_map(str(archive_files(path)[0])) as source:
        metadata = pa.ipc.open_stream(source).schema.metadata or {}
    return {k.decode(): v.decode() for k, v in metadata.items()}
