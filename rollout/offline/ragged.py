"""Arrow list columns <-> (B, T) zero-padded tensors, for replay: checked, vectorised over the list
buffers, never a Python loop over rows."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import torch

from rollout.offline.rescore import ReplayError


def lengths_of(column: pa.Array) -> np.ndarray:
    """(B,) int64 list lengths."""
    return np.diff(np.asarray(column.offsets)).astype(np.int64)


def required(batch: pa.RecordBatch, name: str, lengths: np.ndarray) -> pa.Array:
    return required_column(batch.column(name), name, lengths)


def required_column(column: pa.Array, name: str, lengths: np.ndarray) -> pa.Array:
    """The list column, checked to be non-null with one entry per response token."""
    if column.null_count:
        raise ReplayError(f"column {name} is null in {column.null_count} rows; replay needs it")
    mismatched = np.flatnonzero(lengths_of(column) != lengths)
    if mismatched.size:
        raise ReplayError(
            f"column {name} does not have one entry per response token in "
            f"{mismatched.size} rows (first: batch row {mismatched[0]})"
        )
    return column


def padded(column: pa.Array, width: int) -> torch.Tensor:
    """Ragged float lists -> (B, width) float32 tensor, zero-padded, from the list buffers."""
    offsets = np.asarray(column.offsets).astype(np.int64)
    lengths = np.diff(offsets)
    values = column.values.to_numpy(zero_copy_only=False)[offsets[0] : offsets[-1]]
    rows = np.repeat(np.arange(lengths.size), lengths)
    cols = np.arange(values.size) - np.repeat(offsets[:-1] - offsets[0], lengths)  # t within the row
    out = np.zeros((lengths.size, width), dtype=np.float32)
    out[rows, cols] = values
    return torch.from_numpy(out)


def ragged(x: torch.Tensor, mask: torch.Tensor) -> pa.Array:
    """(B, T) tensor -> list<float32> of each row's valid prefix."""
    lengths = mask.sum(dim=1).numpy()
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    values = x[mask].to(torch.float32).numpy()  # row-major: each row's prefix, rows in order
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values, pa.float32()))


def floats(column: pa.Array | pa.ChunkedArray, name: str) -> np.ndarray:
    if column.null_count:
        raise ReplayError(f"column {name} is null in {column.null_count} rows; replay needs it")
    return column.to_numpy().astype(np.float32)
