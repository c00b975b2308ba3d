"""Columnar data sources: Parquet, Arrow IPC, directories and globs of them, `datasets` directories, `hf:`.

Each reads its spec into one `pyarrow.Table`, column-wise, without turning rows into Python objects:
a job's prompts stay in that table and a row becomes a record only when it is drawn
(`rollout.driver.prompts`). Every reader says in one line (`DataSourceError`) what it cannot read and
what to change: a missing path, a file that is not what its name says, a directory with nothing to
read, a dataset the hub does not serve.

- Parquet: `.parquet`, `.pq`.
- Arrow IPC: `.arrow`, `.feather`, `.ipc`, either the file format or the stream format (`datasets`
  writes streams).
- A directory written by `datasets`' `save_to_disk` (it holds `state.json`, which lists the Arrow
  files in order), or any other directory: every Parquet and Arrow file in it, sorted by name.
- A glob (`data/train-*.parquet`): the files it matches, sorted by name.
- `hf:NAME[:SPLIT]`: `datasets.load_dataset(NAME, split=SPLIT or "train")`, with `data.source_params`
  `name` (the configuration) and `revision`. It honours `HF_HUB_OFFLINE`, and where no hub answers it
  fails within `HUB_TIMEOUT_S`.
"""

from __future__ import annotations

import glob
import json
import os
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.ipc as ipc
import pyarrow.parquet as pq

from contracts.data_sources import DATA_SOURCES, DataSourceError

PARQUET_SUFFIXES = (".parquet", ".pq")
ARROW_SUFFIXES = (".arrow", ".feather", ".ipc")
HUB_TIMEOUT_S = 30.0
PARQUET_BATCH_ROWS = 65_536
PARQUET_MAGIC = b"PAR1"
ARROW_FILE_MAGIC = b"ARROW1"
ARROW_STREAM_MAGIC = b"\xff\xff\xff\xff"


def parquet_columns(path: str, params: Mapping[str, Any]) -> list[str]:
    """A Parquet file's column names, from its footer alone."""
    _check_exists(path)
    try:
        return pq.read_schema(path).names
    except (pa.ArrowInvalid, OSError) as e:
        raise DataSourceError(f"{path}: not a Parquet file ({_first(e)}){_looks_like(path)}") from None


@DATA_SOURCES.register("parquet", suffixes=PARQUET_SUFFIXES, prefix=None, columnar=True, columns=parquet_columns)
def parquet_table(path: str, params: Mapping[str, Any]) -> pa.Table:
    """A Parquet file's table (every row group)."""
    _check_exists(path)
    try:
        # A batch at a time: `read_table` decodes every column chunk at once and its buffers stay with the
        # allocator, holding twice the table's memory where this holds little more than the table.
        parquet = pq.ParquetFile(path)
        return pa.Table.from_batches(list(parquet.iter_batches(batch_size=PARQUET_BATCH_ROWS)), parquet.schema_arrow)
    except (pa.ArrowInvalid, OSError) as e:
        raise DataSourceError(f"{path}: not a Parquet file ({_first(e)}){_looks_like(path)}") from None


def arrow_columns(path: str, params: Mapping[str, Any]) -> list[str]:
    """An Arrow IPC file's column names, from its schema alone."""
    return _read_arrow(path, lambda reader: reader.schema.names)


@DATA_SOURCES.register("arrow", suffixes=ARROW_SUFFIXES, prefix=None, columnar=True, columns=arrow_columns)
def arrow_table(path: str, params: Mapping[str, Any]) -> pa.Table:
    """An Arrow IPC file, in the file format or the stream format, told apart by its first bytes."""
    return _read_arrow(path, lambda reader: reader.read_all())


def _read_arrow(path: str, read):
    _check_exists(path)
    with open(path, "rb") as f:
        head = f.read(8)
    try:
        with pa.memory_map(path) as source:
            return read(ipc.open_file(source) if head.startswith(ARROW_FILE_MAGIC) else ipc.open_stream(source))
    except (pa.ArrowInvalid, OSError) as e:
        raise DataSourceError(f"{path}: not an Arrow IPC file or stream ({_first(e)}){_looks_like(path)}") from None


def directory_files(path: str) -> list[str]:
    """The files a directory source reads, in order: those a `datasets` `state.json` lists, else every Parquet
    and Arrow file in it, by name."""
    state = Path(path) / "state.json"
    if state.is_file():
        try:
            return [str(Path(path) / f["filename"]) for f in json.loads(state.read_text())["_data_files"]]
        except (ValueError, KeyError, TypeError) as e:
            raise DataSourceError(f"{state}: not a `datasets` state file ({e}); save the dataset again") from None
    files = sorted(str(p) for p in Path(path).iterdir() if p.suffix.lower() in PARQUET_SUFFIXES + ARROW_SUFFIXES)
    if not files:
        raise DataSourceError(
            f"{path}: a directory with no Parquet or Arrow files and no `datasets` state.json; "
            "point data.prompts at a data file, or at a directory of .parquet/.arrow files"
        )
    return files


@DATA_SOURCES.register(
    "directory",
    prefix=None,
    columnar=True,
    directories=True,
    columns=lambda path, params: _file_columns(directory_files(path)[0], params),
)
def directory_table(path: str, params: Mapping[str, Any]) -> pa.Table:
    """A `datasets` `save_to_disk` directory (its `state.json` lists the Arrow files, which `datasets` writes
    whatever their names), else every Parquet and Arrow file in the directory, by name."""
    read = arrow_table if (Path(path) / "state.json").is_file() else _table_file
    return _concat([read(f, params) for f in directory_files(path)], path)


def glob_files(pattern: str) -> list[str]:
    """The Parquet or Arrow files a glob matches, by name."""
    files = sorted(glob.glob(pattern))
    if not files:
        raise DataSourceError(f"{pattern}: no files match; check the pattern in data.prompts")
    others = [f for f in files if Path(f).suffix.lower() not in PARQUET_SUFFIXES + ARROW_SUFFIXES]
    if others:
        raise DataSourceError(
            f"{pattern}: matches {others[0]}, which is not a Parquet or Arrow file; a glob reads those only "
            "(name one JSONL file, or narrow the pattern)"
        )
    return files


@DATA_SOURCES.register(
    "glob",
    prefix=None,
    columnar=True,
    globs=True,
    columns=lambda spec, params: _file_columns(glob_files(spec)[0], params),
)
def glob_table(pattern: str, params: Mapping[str, Any]) -> pa.Table:
    """Every Parquet or Arrow file the pattern matches, by name."""
    return _concat([_table_file(f, params) for f in glob_files(pattern)], pattern)


@DATA_SOURCES.register("hf", prefix="hf:", columnar=True)
def hub_table(spec: str, params: Mapping[str, Any]) -> pa.Table:
    """`hf:NAME[:SPLIT]` through `datasets.load_dataset`, bounded by `HUB_TIMEOUT_S`: a dataset that is
    neither cached nor reachable fails in one line naming it."""
    name, _, split = spec.removeprefix("hf:").partition(":")
    if not name:
        raise DataSourceError(f"{spec}: no dataset named; write hf:NAME or hf:NAME:SPLIT")
    unknown = sorted(set(params) - {"name", "revision"})
    if unknown:
        raise DataSourceError(f"data.source_params: hf: takes name and revision, not {', '.join(unknown)}")
    try:
        import datasets
    except ImportError:
        raise DataSourceError(f"{spec}: hf: needs the `datasets` package; pip install datasets") from None
    outcome: list[Any] = []

    def load() -> None:
        try:
            dataset = datasets.load_dataset(
                name, params.get("name"), split=split or "train", revision=params.get("revision")
            )
            outcome.append(dataset.data.table)
        except BaseException as e:  # noqa: BLE001 - reported in the caller's thread
            outcome.append(e)

    loading = threading.Thread(target=load, daemon=True, name=f"load {name}")
    loading.start()
    loading.join(HUB_TIMEOUT_S)
    if not outcome:
        raise DataSourceError(
            f"{spec}: no answer from the Hugging Face hub in {HUB_TIMEOUT_S:.0f} s loading {name!r}; "
            "download it where the hub is reachable (it is then cached), or save it to disk and name the directory"
        )
    if isinstance(outcome[0], BaseException):
        offline = " (HF_HUB_OFFLINE is set: only cached datasets load)" if _hub_offline() else ""
        raise DataSourceError(f"{spec}: cannot load dataset {name!r}{offline}: {_first(outcome[0])}") from None
    return outcome[0].combine_chunks() if outcome[0].num_rows else outcome[0]


def _file_columns(path: str, params: Mapping[str, Any]) -> list[str]:
    suffix = Path(path).suffix.lower()
    return parquet_columns(path, params) if suffix in PARQUET_SUFFIXES else arrow_columns(path, params)


def _table_file(path: str, params: Mapping[str, Any]) -> pa.Table:
    suffix = Path(path).suffix.lower()
    return parquet_table(path, params) if suffix in PARQUET_SUFFIXES else arrow_table(path, params)


def _concat(tables: list[pa.Table], where: str) -> pa.Table:
    """Tables of one schema as one; DataSourceError naming the first file whose columns differ."""
    try:
        return pa.concat_tables(tables, promote_options="permissive")
    except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
        raise DataSourceError(
            f"{where}: its files' columns do not agree ({_first(e)}); give files of one schema"
        ) from None


def _check_exists(path: str) -> None:
    if not os.path.exists(path):
        raise DataSourceError(f"{path}: no such file; check data.prompts")


def _looks_like(path: str) -> str:
    """What the file's first bytes say it is, when that is not what its name says."""
    with open(path, "rb") as f:
        head = f.read(8)
    if head.startswith(PARQUET_MAGIC):
        return "; it is a Parquet file: name it .parquet"
    if head.startswith(ARROW_FILE_MAGIC) or head.startswith(ARROW_STREAM_MAGIC):
        return "; it is an Arrow IPC file: name it .arrow"
    if head.lstrip()[:1] in (b"{", b"["):
        return "; it looks like JSON: name it .jsonl or .json"
    return ""


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def _first(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__
