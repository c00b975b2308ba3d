"""Data sources: how the records `data.prompts` (and the other data settings) names are read.

A source is a registry entry chosen by the spec it is given: a scheme prefix (`hf:NAME`,
`reasoning_gym:TASK`), a directory or glob, or a file's suffix; a path nothing else claims is read by
`DEFAULT`, the JSON reader, which tells JSONL from one JSON array by the file's first character.
A source may also register `check(spec, params)`, its checks that take a moment (the file there, the task
known), and a columnar one `columns(spec, params)`, its column names read from the schema alone: a job runs
both before it starts Ray. There are two shapes of reader, named by the entry's `columnar` attribute:

- a row reader, `reader(spec, params) -> Iterator[(n, record)]`, yields each decoded record (a
  dict) with its line or row number, or `(n, BadRecord)` for one that cannot be read, in order;
- a columnar reader, `reader(spec, params) -> pyarrow.Table`, reads the whole table at once, row
  numbers counting from 0 as `datasets` and pandas index them.

`params` are the source's settings (`data.source_params`). Prompt files, preference files, `rollout
validate` and `reward score` read every source through `read_data`, which gives both shapes as rows; the
job's prompts keep a columnar source's table as it is (`rollout.driver.prompts`). A source that cannot
read its spec at all raises `DataSourceError`, one line naming the spec and what to change.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping
from pathlib import PurePath
from typing import Any, TypeVar

from contracts.errors import UserError
from contracts.jsonl import BadRecord, FormatError, iter_json_records
from contracts.registry import Registry

T = TypeVar("T")

DataReader = Callable[[str, Mapping[str, Any]], Any]

# The built-ins beyond JSON live in the modules named here, which import this one to register themselves.
DATA_SOURCES: Registry[DataReader] = Registry(
    "data source", "data.prompts", modules=("contracts.table_sources", "contracts.reasoning_gym_source")
)

ROW_BATCH = 4096  # rows converted to Python at a time when a table is read row by row


class DataSourceError(UserError, ValueError):
    """A data source cannot read what it was given (no such file, a file that is not what its name says,
    an unknown dataset or task): the message is one line naming the spec and what to change."""


def check_json(path: str, params: Mapping[str, Any]) -> None:
    """The file opens and is not a binary format under a JSON name (a Parquet or Arrow file), which would
    otherwise be a bad record per line. OSError or DataSourceError."""
    with open(path, "rb") as f:
        head = f.read(8)
    for magic, kind, suffix in _BINARY_FORMATS:
        if head.startswith(magic):
            raise DataSourceError(f"{path}: is {kind} file, not JSON or JSONL: name it {suffix}")


@DATA_SOURCES.register("json", suffixes=(".jsonl", ".json"), prefix=None, columnar=False, check=check_json)
def json_records(path: str, params: Mapping[str, Any]) -> Iterator[tuple[int, Any]]:
    """JSONL, or one JSON array, read in constant memory (`contracts.jsonl.iter_json_records`)."""
    check_json(path, params)
    return iter_json_records(path)


_BINARY_FORMATS = ((b"PAR1", "a Parquet", ".parquet"), (b"ARROW1", "an Arrow IPC", ".arrow"))


DEFAULT = "json"  # reads a path no source claims


def data_source(spec: str | os.PathLike[str]) -> str:
    """The name of the source that reads `spec`: the one whose prefix it starts with, else the one that
    claims directories (for a directory) or globs (for a pattern), else the one registered with its
    suffix (any case), else `DEFAULT`."""
    text = os.fspath(spec)
    entries = [DATA_SOURCES.entry(name) for name in DATA_SOURCES]
    for entry in entries:
        prefix = entry.attributes.get("prefix")
        if prefix and text.startswith(prefix):
            return entry.name
    for claim, applies in (("directories", os.path.isdir), ("globs", _is_glob)):
        if applies(text):
            named = [e.name for e in entries if e.attributes.get(claim)]
            if named:
                return named[0]
    suffix = PurePath(text).suffix.lower()
    return next((e.name for e in entries if suffix in e.attributes.get("suffixes", ())), DEFAULT)


def is_columnar(spec: str | os.PathLike[str]) -> bool:
    """Whether the source reading `spec` reads it as one Arrow table."""
    return bool(DATA_SOURCES.entry(data_source(spec)).attributes.get("columnar"))


def read_table(spec: str | os.PathLike[str], params: Mapping[str, Any] | None = None):
    """The whole of a columnar source's `spec` as a `pyarrow.Table`. DataSourceError if it cannot be read."""
    text = os.fspath(spec)
    name = data_source(text)
    if not DATA_SOURCES.entry(name).attributes.get("columnar"):
        raise ValueError(f"{text}: the {name} source reads rows, not a table")
    return DATA_SOURCES[name](text, params or {})


def read_data(spec: str | os.PathLike[str], params: Mapping[str, Any] | None = None) -> Iterator[tuple[int, Any]]:
    """`(n, record)` for each record `spec` names, or `(n, BadRecord)`, by its source: a line number for a
    JSON file, a row number (from 0) for a table. Raises OSError if a file cannot be opened, DataSourceError
    if the source cannot read `spec` at all."""
    text = os.fspath(spec)
    name = data_source(text)
    reader = DATA_SOURCES[name]
    if not DATA_SOURCES.entry(name).attributes.get("columnar"):
        return reader(text, params or {})
    return table_rows(reader(text, params or {}))


def table_rows(table) -> Iterator[tuple[int, Any]]:
    """A table's rows as `(row, dict)`, converted a batch at a time."""
    row = 0
    for batch in table.to_batches(max_chunksize=ROW_BATCH):
        for record in batch.to_pylist():
            yield row, record
            row += 1


def parse_records(
    spec: str | os.PathLike[str],
    parse: Callable[[Any, str], T],
    params: Mapping[str, Any] | None = None,
) -> Iterator[T | BadRecord]:
    """Each record of a data source through `parse(obj, "SPEC:N")`; unreadable records and those `parse`
    rejects with FormatError come back as BadRecord, in order."""
    text = os.fspath(spec)
    for line, obj in read_data(text, params):
        if isinstance(obj, BadRecord):
            yield obj
            continue
        try:
            yield parse(obj, f"{text}:{line}")
        except FormatError as e:
            yield BadRecord(text, line, str(e))


def _is_glob(text: str) -> bool:
    return any(c in text for c in "*?[")
