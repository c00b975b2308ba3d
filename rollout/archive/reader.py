"""Reading the rollout archive, as one table of one schema.

Reading tolerates a file cut mid-batch (a crash): it yields every complete batch and warns about
the rest. Readers see one schema for the whole archive: v1 files are converted
(`rollout/archive/v1.py`), and files written with other reward components (a run resumed with
another reward config) have the union of them, null where a file lacks one.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from contracts.errors import UserError
from contracts.schema import (
    archive_schema,
    components_of,
)
from rollout.archive.v1 import V1Upgrade, is_v1, map_keys
from rollout.archive.v2 import episode_columns, is_before_v3
from rollout.archive.v3 import is_before_v4, version_columns


class ArchiveCutWarning(UserWarning):
    """An archive file ended mid-batch; the complete batches before the cut were read."""


class ArchiveCorruptError(UserError, ValueError):
    """An archive file holds a record batch that is not valid Arrow data; the message names file and batch."""


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


def _file_schema(file: Path) -> pa.Schema | None:
    try:
        with pa.memory_map(str(file)) as source:
            return pa.ipc.open_stream(source).schema
    except (pa.ArrowInvalid, OSError):
        return None


def _metadata(schema: pa.Schema) -> dict[str, str]:
    return {k.decode(): v.decode() for k, v in (schema.metadata or {}).items()}


_END_OF_STREAM = b"\xff\xff\xff\xff\x00\x00\x00\x00"


def _file_batches(file: Path) -> Iterator[pa.RecordBatch]:
    """A file's record batches, each fully validated (offsets, lengths, UTF-8), so corrupt data never
    reaches a reader. A file a crash cut (no end-of-stream marker) warns and stops at its last whole
    batch; one that was closed whole and still fails to read, or a batch that fails validation, is
    corrupt: ArchiveCorruptError names the file and the batch. A file with no readable header is skipped."""
    closed_whole = file.stat().st_size >= 8 and _tail(file) == _END_OF_STREAM
    with pa.memory_map(str(file)) as source:
        try:
            reader = pa.ipc.open_stream(source)
        except (pa.ArrowInvalid, OSError) as e:
            warnings.warn(f"{file}: unreadable header ({e}); skipped", ArchiveCutWarning, stacklevel=3)
            return
        index = 0
        while True:
            try:
                batch = reader.read_next_batch()
            except StopIteration:
                return
            except (pa.ArrowInvalid, OSError) as e:
                if closed_whole:
                    raise ArchiveCorruptError(
                        f"{file}: record batch {index} cannot be read ({e}), though the "
                        "file was closed whole: it is corrupt"
                    ) from None
                warnings.warn(
                    f"{file}: cut mid-batch ({e}); read up to its last complete batch", ArchiveCutWarning, stacklevel=3
                )
                return
            try:
                batch.validate(full=True)
            except (pa.ArrowInvalid, pa.ArrowException) as e:
                raise ArchiveCorruptError(f"{file}: record batch {index} is corrupt ({e})") from None
            yield batch
            index += 1


def _tail(file: Path) -> bytes:
    with file.open("rb") as f:
        f.seek(-8, 2)
        return f.read(8)


class _Reader:
    """One schema v3 view over an archive's files, whatever their version and reward components."""

    def __init__(self, path: str | Path):
        self.path = path
        self.files = archive_files(path)
        schemas = {file: _file_schema(file) for file in self.files}
        self.v1_files = {f for f, s in schemas.items() if s is not None and is_v1(_metadata(s))}
        components: dict[str, None] = {}
        for file, schema in schemas.items():
            if schema is None:
                continue
            if file in self.v1_files:
                columns = (b.column("reward_components") for b in _file_batches(file))
                with warnings.catch_warnings():  # the batch pass warns, once
                    warnings.simplefilter("ignore", ArchiveCutWarning)
                    components.update(dict.fromkeys(map_keys(columns)))
            else:
                components.update(dict.fromkeys(components_of(schema)))
        self.schema = archive_schema(list(components))
        first = next((s for s in schemas.values() if s is not None), None)
        self.metadata = _metadata(first) if first is not None else {}
        self._v1 = V1Upgrade(list(components), self.metadata, read_run_metrics(path)) if self.v1_files else None

    def batches(self, columns: list[str] | None = None) -> Iterator[pa.RecordBatch]:
        for file in self.files:
            for batch in _file_batches(file):
                if file in self.v1_files:
                    batch = self._v1(batch)
                batch = self._conform(batch.replace_schema_metadata(None))
                yield batch.select(columns) if columns else batch

    def _conform(self, batch: pa.RecordBatch) -> pa.RecordBatch:
        """The batch with the archive-wide `reward_components` fields, null where it lacks one, and the
        columns of schemas v3 and v4 (a file of an earlier version lacks them: `v2.py`, `v3.py`)."""
        if batch.schema.equals(self.schema):
            return batch
        filled = episode_columns(batch) if is_before_v3(batch.schema) else {}
        if is_before_v4(batch.schema):
            filled.update(version_columns(batch))
        column = batch.column("reward_components")
        own = dict(zip((f.name for f in column.type), column.flatten()))
        fields = list(self.schema.field("reward_components").type)
        children = [own.get(f.name, pa.nulls(len(column), pa.float32())) for f in fields]
        components = (
            pa.StructArray.from_arrays(children, fields=fields, mask=column.is_null())
            if fields
            else pa.array([{}] * len(column), pa.struct([]))
        )
        arrays = [
            components
            if f.name == "reward_components"
            else filled[f.name]
            if f.name in filled
            else batch.column(f.name)
            for f in self.schema
        ]
        return pa.RecordBatch.from_arrays(arrays, schema=self.schema)


def read_schema(path: str | Path) -> pa.Schema:
    """The archive's schema v3, as `iter_batches` yields it: every file's reward components."""
    return _Reader(path).schema


def iter_batches(path: str | Path, columns: list[str] | None = None) -> Iterator[pa.RecordBatch]:
    """Every complete record batch of an archive as schema v2, across its files; a cut file warns and stops there."""
    return _Reader(path).batches(columns)


def read_table(path: str | Path, columns: list[str] | None = None) -> pa.Table:
    """The whole archive as one table (columns selectable, to keep replay and stats lean)."""
    reader = _Reader(path)
    schema = reader.schema if columns is None else pa.schema([reader.schema.field(c) for c in columns])
    return pa.Table.from_batches(list(reader.batches(columns)), schema=schema).replace_schema_metadata(reader.metadata)


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
    return read_file_metadata(archive_files(path)[0])


def read_file_metadata(file: Path) -> dict[str, str]:
    """One archive file's schema metadata; {} for a file whose header cannot be read."""
    schema = _file_schema(file)
    return _metadata(schema) if schema is not None else {}


# --- the run around the archive ------------------------------------------------------------------


def run_dir_of(archive: str | Path) -> Path:
    """The run directory an archive belongs to: the parent of its `rollouts/` folder."""
    folder = archive_files(archive)[0].parent
    return folder.parent if folder.name == "rollouts" else folder


def read_run_metrics(archive: str | Path) -> dict[int, dict[str, Any]]:
    """The run's `metrics.jsonl` lines by iteration (the last line wins), or {} when there is none.

    A replayed archive has no metrics of its own: its generation happened in the run it was
    replayed from (`replayed_from` in its metadata), whose metrics are read instead.
    """
    seen: set[Path] = set()
    while archive is not None and Path(archive).exists() and Path(archive).resolve() not in seen:
        seen.add(Path(archive).resolve())
        path = run_dir_of(archive) / "metrics.jsonl"
        if path.is_file():
            lines = (json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip())
            return {int(m["iteration"]): m for m in lines if "iteration" in m}
        archive = read_metadata(archive).get("replayed_from")
    return {}
