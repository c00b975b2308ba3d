"""The rollout archive: the writer the job streams to, and the reader offline tools and users read with
(`from rollout.archive import read_table`, as docs/archive.md shows)."""

from rollout.archive.reader import (
    ArchiveCorruptError,
    ArchiveCutWarning,
    archive_files,
    iter_batches,
    last_archived_iteration,
    read_file_metadata,
    read_metadata,
    read_run_metrics,
    read_schema,
    read_table,
    run_dir_of,
)
from rollout.archive.writer import ArchiveWriteError, ArchiveWriter

__all__ = [
    "ArchiveCorruptError",
    "ArchiveCutWarning",
    "ArchiveWriteError",
    "ArchiveWriter",
    "archive_files",
    "iter_batches",
    "last_archived_iteration",
    "read_file_metadata",
    "read_metadata",
    "read_run_metrics",
    "read_schema",
    "read_table",
    "run_dir_of",
]
