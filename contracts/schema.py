"""The rollout record: one sample (a prompt and its completion, or an episode), field for field the
archive's schema v4.

Generation fills the engine fields, reward fills `reward` and `reward_components`, the learner
fills `ref_logprobs`, `values`, `kl`, `kl_coef`, `token_rewards`, `advantages` and `returns` (left
None by `rollout generate`). `archive_schema` is derived from nothing else: a field added here
without a column there is a test failure, not a silent drop.

`reward_components` is a struct with one float32 field per component, so every Arrow reader
(`datasets`, pandas, polars, DuckDB) loads it. The components are fixed when a run starts (the
reward config's rules, then the reward model), so the schema of a run is `archive_schema(names)`.
Version 1 archives (a string -> float32 map, no `kl` / `kl_coef`) are converted on read
(`rollout/archive/v1.py`).

Version 3 keeps an episode (model turns, with an environment's turns between them) as one row:
`response_ids` holds every token after the prompt, `response_mask` says which the model generated (1)
and which the environment wrote (0), `num_turns` counts the model's turns, `final_turn` is the model's
last turn (what the reward rules score), `turn_rewards` lands at the response token each
`turn_reward_at` names (an environment's reward of a model turn, on the turn's last token), `env_error`
is the first line of an environment's error (finish_reason `env_error`), and `trained` is false for a
sample that was generated but left out of the update. A single completion has an all-ones mask, one
turn, no turn rewards. Version 2 archives read as version 3 with those values (`rollout/archive/v2.py`).

Version 4 keeps where a sample's weights changed and which segment of an agent's episode a row is. With
partial rollouts a sample may be cut when new weights load and resumed under them: `policy_version` is
its first token's version, `policy_version_last` its last token's, and `resumed_at[j]` is the response
token a resume began at, sampled from then on by `resumed_versions[j]`. An agent's episode whose calls
do not all extend one conversation is several rows: `episode_id` (unique in the run; null for a sample
that is not an agent's episode) and `segment` (0, 1, ...). A version 3 row reads as version 4 with one
version throughout, no resume, no episode id and segment 0 (`rollout/archive/v3.py`).
"""

from __future__ import annotations

import datetime as dt
import itertools
from collections.abc import Sequence

import msgspec
import numpy as np
import pyarrow as pa

SCHEMA_VERSION = 4


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
    kl: list[float] | None = None
    kl_coef: float | None = None
    token_rewards: list[float] | None = None
    advantages: list[float] | None = None
    returns: list[float] | None = None
    response_mask: list[int] | None = None  # None: every response token is the model's
    num_turns: int = 1
    final_turn: str | None = None  # None: the response
    turn_reward_at: list[int] = msgspec.field(default_factory=list)
    turn_rewards: list[float] = msgspec.field(default_factory=list)
    env_error: str | None = None
    trained: bool = True
    policy_version_last: int | None = None  # None: `policy_version`
    resumed_at: list[int] = msgspec.field(default_factory=list)
    resumed_versions: list[int] = msgspec.field(default_factory=list)
    episode_id: str | None = None
    segment: int = 0

    def filled(self, name: str):
        """The field as the archive stores it: the defaults of a single completion written out."""
        value = getattr(self, name)
        if name == "response_mask" and value is None:
            return [1] * len(self.response_ids)
        if name == "final_turn" and value is None:
            return self.response
        if name == "policy_version_last" and value is None:
            return self.policy_version
        return value


_f32_list = pa.list_(pa.float32())
_i32_list = pa.list_(pa.int32())
_u8_list = pa.list_(pa.uint8())


def components_type(components: Sequence[str]) -> pa.StructType:
    """The `reward_components` column's type: one float32 field per component, in run order."""
    if len(set(components)) != len(components):
        raise ValueError(f"reward component names repeat: {list(components)}")
    return pa.struct([pa.field(name, pa.float32()) for name in components])


def archive_schema(components: Sequence[str]) -> pa.Schema:
    """Schema v4 of a run whose reward components are `components`."""
    return pa.schema(
        [
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
            pa.field("kl", _f32_list),
            pa.field("kl_coef", pa.float32()),
            pa.field("token_rewards", _f32_list),
            pa.field("reward", pa.float32()),
            pa.field("reward_components", components_type(components)),
            pa.field("advantages", _f32_list),
            pa.field("returns", _f32_list),
            pa.field("finish_reason", pa.string(), nullable=False),
            pa.field("worker", pa.string(), nullable=False),
            pa.field("generated_at", pa.timestamp("us", tz="UTC"), nullable=False),
            *EPISODE_FIELDS,
            *V4_FIELDS,
        ]
    )


# Version 3's columns: what an episode adds to a completion, and whether the update used the sample.
EPISODE_FIELDS = (
    pa.field("response_mask", _u8_list, nullable=False),
    pa.field("num_turns", pa.int32(), nullable=False),
    pa.field("final_turn", pa.string(), nullable=False),
    pa.field("turn_reward_at", _i32_list, nullable=False),
    pa.field("turn_rewards", _f32_list, nullable=False),
    pa.field("env_error", pa.string()),
    pa.field("trained", pa.bool_(), nullable=False),
)


# Version 4's columns: where a sample's weights changed (partial rollouts), and an agent episode's segments.
V4_FIELDS = (
    pa.field("policy_version_last", pa.int32(), nullable=False),
    pa.field("resumed_at", _i32_list, nullable=False),
    pa.field("resumed_versions", _i32_list, nullable=False),
    pa.field("episode_id", pa.string()),
    pa.field("segment", pa.int32(), nullable=False),
)


def components_of(schema: pa.Schema) -> tuple[str, ...]:
    """The reward component names of a v2, v3 or v4 schema."""
    return tuple(f.name for f in schema.field("reward_components").type)


FINISH_REASONS = ("stop", "length", "error", "env_error", "max_turns")
REWARD_FIELDS = ("reward", "reward_components")


def reward_schema(components: Sequence[str]) -> pa.Schema:
    schema = archive_schema(components)
    return pa.schema([schema.field(name) for name in REWARD_FIELDS])


def components_array(rows: Sequence[dict[str, float] | None], components: Sequence[str]) -> pa.StructArray:
    """Per-sample {component: value} (None for an unscored sample) as a `reward_components` column;
    a component a row lacks is null there."""
    if not components:  # a struct with no fields has no child to carry the length
        return pa.array([None if r is None else {} for r in rows], pa.struct([]))
    mask = np.fromiter((r is None for r in rows), dtype=bool, count=len(rows))
    children = [pa.array([None if r is None else r.get(name) for r in rows], pa.float32()) for name in components]
    return pa.StructArray.from_arrays(
        children, fields=list(components_type(components)), mask=pa.array(mask) if mask.any() else None
    )


def reward_batch(results, components: Sequence[str]) -> pa.RecordBatch:
    """Reward results (`total`, `components`), one per sample, as the archive's reward columns."""
    return pa.RecordBatch.from_arrays(
        [
            pa.array(np.array([r.total for r in results], dtype=np.float32)),
            components_array([r.components for r in results], components),
        ],
        schema=reward_schema(components),
    )


def to_record_batch(records: list[RolloutRecord], components: Sequence[str]) -> pa.RecordBatch:
    """Column-wise conversion of records to one Arrow batch of `archive_schema(components)`."""
    schema = archive_schema(components)
    columns = []
    for field in schema:
        values = [r.filled(field.name) for r in records]
        if field.name == "reward_components":
            columns.append(components_array(values, components))
        elif pa.types.is_list(field.type):
            columns.append(_list_array(values, field.type))
        else:
            columns.append(pa.array(values, type=field.type))
    return pa.RecordBatch.from_arrays(columns, schema=schema)


def _list_array(rows: list[list | None], kind: pa.ListType) -> pa.ListArray:
    """Token lists through one flat numpy buffer and offsets: per-element conversion by `pa.array`
    dominates archive writing otherwise."""
    nulls = np.fromiter((r is None for r in rows), dtype=bool, count=len(rows))
    lengths = np.fromiter((0 if r is None else len(r) for r in rows), dtype=np.int32, count=len(rows))
    offsets = np.zeros(len(rows) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    dtype = kind.value_type.to_pandas_dtype()
    flat = np.fromiter(
        itertools.chain.from_iterable(r for r in rows if r is not None), dtype=dtype, count=int(offsets[-1])
    )
    return pa.ListArray.from_arrays(
        pa.array(offsets), pa.array(flat, type=kind.value_type), mask=pa.array(nulls) if nulls.any() else None
    )


def from_record_batch(batch: pa.RecordBatch) -> list[RolloutRecord]:
    """The inverse of `to_record_batch` (for tests and small archives; the service works on columns).

    A batch with only some of the columns (a rollout worker's generation batch) leaves the rest None; columns
    that are no field of the record (those a generation batch carries to the reward workers only) are left out.
    """
    fields = {f.name for f in msgspec.structs.fields(RolloutRecord)}
    rows = batch.select([name for name in batch.schema.names if name in fields]).to_pylist()
    optional = [f.name for f in msgspec.structs.fields(RolloutRecord) if f.default is None]
    for row in rows:
        for name in optional:
            row.setdefault(name, None)
        if row["reward_components"] is not None:
            row["reward_components"] = {k: v for k, v in row["reward_components"].items() if v is not None}
    return [RolloutRecord(**row) for row in rows]
