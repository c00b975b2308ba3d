"""Data sources: how a data file's records are read, chosen by the file's path.

A data source reads a path into its decoded records in file order, each as `(line, record)`, or
`(line, BadRecord)` for one that cannot be read, so that every reader reports a bad record the same
way (`FILE:LINE: reason`). `DATA_SOURCES` holds them, each registered with the path suffixes it reads;
a path whose suffix none claims is read by `DEFAULT`, the JSON reader, which tells JSONL from one JSON
array by the file's first character. Prompt files (`data.prompts`), preference files, `rollout
validate` and `reward score` all read through `read_data`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import PurePath
from typing import Any, TypeVar

from contracts.jsonl import BadRecord, FormatError, iter_json_records
from contracts.registry import Registry

T = TypeVar("T")

DataReader = Callable[[str], Iterator[tuple[int, Any]]]

DATA_SOURCES: Registry[DataReader] = Registry("data source", "data.prompts")


@DATA_SOURCES.register("json", suffixes=(".jsonl", ".json"))
def json_records(path: str) -> Iterator[tuple[int, Any]]:
    """JSONL, or one JSON array, read in constant memory (`contracts.jsonl.iter_json_records`)."""
    return iter_json_records(path)


DEFAULT = "json"  # reads a path no source claims by its suffix


def data_source(path: str | os.PathLike[str]) -> str:
    """The name of the source that reads `path`: the one registered with its suffix (any case), else
    `DEFAULT`."""
    suffix = PurePath(path).suffix.lower()
    return next((e.name for e in map(DATA_SOURCES.entry, DATA_SOURCES) if suffix in e.attributes["suffixes"]), DEFAULT)


def read_data(path: str | os.PathLike[str]) -> Iterator[tuple[int, Any]]:
    """`(line, record)` for each record of the file at `path`, or `(line, BadRecord)`, by its source.
    Raises OSError if the file cannot be opened."""
    file = os.fspath(path)
    return DATA_SOURCES[data_source(file)](file)


def parse_records(path: str | os.PathLike[str], parse: Callable[[Any, str], T]) -> Iterator[T | BadRecord]:
    """Each record of a data file through `parse(obj, "FILE:LINE")`; unreadable records and those
    `parse` rejects with FormatError come back as BadRecord, in file order."""
    file = os.fspath(path)
    for line, obj in read_data(file):
        if isinstance(obj, BadRecord):
            yield obj
            continue
        try:
            yield parse(obj, f"{file}:{line}")
        except FormatError as e:
            yield BadRecord(file, line, str(e))
