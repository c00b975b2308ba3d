"""The rollout record: one sample (prompt x completion), field for field the archive's schema v1.

Generation fills the engine fields, reward fills `reward` and `reward_components`, the learner
fills `ref_logprobs`, `values`, `token_rewards`, `advantages` and `returns` (left None by
`rollout generate`). `ARCHIVE_SCHEMA` is derived from nothing else: a field added here without a
column there is a test failure, not a silent drop.
"""

from __future__ import annotations

import datetime as dt
import itertools

import msgspec
import numpy as np
import pyarrow as pa

SCHEMA_VERSION = 1


class RolloutRecord(msgspec.Struct, kw_only=True):
    run_id: str
    prompt_id: str
    iteration: int
    policy_version: int
    sample_index: int
    prompt: str
    response: str
    prompt_ids: list[int]
    response_ids: list[int]
    response_logprobs: list[float]
    finish_reason: str
    worker: str
    generated_at: dt.datetime
    reward: float | None = None
    reward_components: dict[str, float] | None = None
    ref_logprobs: list[float] | None = None
    values: list[float] | None = None
    token_rewards: list[float] | None = None
    advantages: list[float] | None = None
    returns: list[float] | None = None


_f32_list = pa.list_(pa.float32())
_i32_list = pa.list_(pa.int32())

ARCHIVE_SCHEMA = pa.schema([
    pa.field("run_id", pa.string(), nullable=False),
    pa.field("prompt_id", pa.string(), nullable=False),
    pa.field("iteration", pa.int32(), nullable=False),
    pa.field("policy_version", pa.int32(), nullable=False),
    pa.field("sample_index", pa.int32(), nullable=False),
    pa.field("prompt", pa.string(), nullable=False),
    pa.field("response", pa.string(), nullable=False),
    pa.field("prompt_ids", _i32_list, nullable=False),
    pa.field("response_ids", _i32_list, nullable=False),
    pa.field("response_logprobs", _f32_list, nullable=False),
    pa.field("ref_logprobs", _f32_list),
    pa.field("values", _f32_list),
    pa.field("token_rewards", _f32_list),
    pa.field("reward", pa.float32()),
    pa.field("reward_components", pa.map_(pa.string(), pa.float32())),
    pa.field("advantages", _f32_list),
    pa.field("returns", _f32_list),
    pa.field("finish_reason", pa.string(), nullable=False),
    pa.field("worker", pa.string(), nullable=False),
    pa.field("generated_at", pa.timestamp("us", tz="UTC"), nullable=False),
])

FINISH_REASONS = ("stop", "length", "error")
REWARD_FIELDS = ("reward", "reward_components")
REWARD_SCHEMA = pa.schema([ARCHIVE_SCHEMA.field(name) for name in REWARD_FIELDS])


def reward_batch(results) -> pa.RecordBatch:
    """Reward results (`total`, `components`), one per sample, as the archive's reward columns."""
    return pa.RecordBatch.from_arrays([
        pa.array(np.array([r.total for r in results], dtype=np.float32)),
        pa.array([list(r.components.items()) for r in results], REWARD_SCHEMA.field("reward_components").type),
    ], schema=REWARD_SCHEMA)


def to_record_batch(records: list[RolloutRecord]) -> pa.RecordBatch:
    """Column-wise conversion of records to one Arrow batch of ARCHIVE_SCHEMA."""
    columns = []
    for field in ARCHIVE_SCHEMA:
        values = [getattr(r, field.name) for r in records]
        if field.name == "reward_components":
            values = [None if v is None else list(v.items()) for v in values]
        if pa.types.is_list(field.type):
            columns.append(_list_array(values, field.type))
        else:
            columns.append(pa.array(values, type=field.type))
    return pa.RecordBatch.from_arrays(columns, schema=ARCHIVE_SCHEMA)


def _list_array(rows: list[list | None], kind: pa.ListType) -> pa.ListArray:
    """Token lists through one flat numpy buffer and offsets: per-element conversion by `pa.array`
    dominates archive writing otherwise."""
    nulls = np.fromiter((r is None for r in rows), dtype=bool, count=len(rows))
    lengths = np.fromiter((0 if r is None else len(r) for r in rows), dtype=np.int32, count=len(rows))
    offsets = np.zeros(len(rows) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    dtype = np.int32 if pa.types.is_int32(kind.value_type) else np.float32
    flat = np.fromiter(itertools.chain.from_iterable(r for r in rows if r is not None), dtype=dtype,
                       count=int(offsets[-1]))
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat, type=kind.value_type),
                                    mask=pa.array(nulls) if nulls.any() else None)


def from_record_batch(batch: pa.RecordBatch) -> list[RolloutRecord]:
    """The inverse of `to_record_batch` (for tests and small archives; the service works on columns).

    A batch with only some of the columns (a rollout worker's generation batch) leaves the rest None.
    """
    rows = batch.to_pylist()
    for row in rows:
        for name in ARCHIVE_SCHEMA.names:
            row.setdefault(name, None)
        if row["reward_components"] is not None:
            row["reward_components"] = dict(row["reward_components"])
    return [RolloutRecord(**row) for row in rows]
