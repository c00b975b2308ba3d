"""Schema v1 archives, read as v2: the one place that knows the v1 layout.

v1 differs from v2 in two ways:
- `reward_components` is a string -> float32 map. It becomes a struct whose fields are the map
  keys seen anywhere in the archive, in first-seen order; a key a row lacks is null there.
- There is no per-token `kl` nor per-row `kl_coef`. v1 token rewards are r_t = −β·kl_t plus the
  score on the last token, so kl_t = −(r_t − [t last]·score) / β, with β the coefficient the run
  used in that iteration: the metadata's `kl_coef` when fixed; under an adaptive controller
  (`kl_target` set) the value the run logged in `metrics.jsonl` at the end of the previous
  iteration (a v1 replay recorded them in the metadata under `kl_coef_by_iteration`). Where β is
  unknown, or 0 (the token rewards hold no KL), or the learner columns are null, `kl` is null;
  `kl_coef` is null only where β is unknown.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from contracts.schema import EPISODE_FIELDS, V4_FIELDS, archive_schema

KL_COEFS_KEY = "kl_coef_by_iteration"  # v1 replay metadata: {iteration: β} as JSON


def is_v1(metadata: dict[str, str]) -> bool:
    return metadata.get("schema_version", "1") == "1"


def map_keys(columns: Iterable[pa.MapArray]) -> list[str]:
    """The keys of v1 `reward_components` map columns, in first-seen order."""
    seen: dict[str, None] = {}
    for column in columns:
        offsets = np.asarray(column.offsets)
        keys = column.keys.slice(int(offsets[0]), int(offsets[-1] - offsets[0]))
        seen.update(dict.fromkeys(k for k in keys.unique().to_pylist()))
    return list(seen)


def kl_coefs(
    metadata: dict[str, str], run_metrics: dict[int, dict[str, Any]], iterations: Iterable[int]
) -> dict[int, float | None]:
    """The KL coefficient β the learner used in each iteration; None where it cannot be known."""
    iterations = list(iterations)
    if KL_COEFS_KEY in metadata:
        recorded = {int(k): v for k, v in json.loads(metadata[KL_COEFS_KEY]).items()}
        return {i: recorded.get(i) for i in iterations}
    if "kl_coef" not in metadata:
        return dict.fromkeys(iterations)
    initial = float(metadata["kl_coef"])
    if metadata.get("kl_target", "None") == "None":
        return dict.fromkeys(iterations, initial)
    logged = sorted((i, m["kl_coef"]) for i, m in run_metrics.items() if m.get("kl_coef") is not None)
    if not logged:
        return dict.fromkeys(iterations)
    coefs = {}
    for i in iterations:
        earlier = [coef for j, coef in logged if j < i]
        coefs[i] = float(earlier[-1]) if earlier else initial
    return coefs


class V1Upgrade:
    """Converts v1 record batches of one archive to v2 (`archive_schema(components)` without the v3 and v4
    columns, which `v2.py` and `v3.py` add)."""

    def __init__(self, components: list[str], metadata: dict[str, str], run_metrics: dict[int, dict[str, Any]]):
        later = {f.name for f in (*EPISODE_FIELDS, *V4_FIELDS)}
        self.schema = pa.schema([f for f in archive_schema(components) if f.name not in later])
        self.components = components
        self.metadata = metadata
        self.run_metrics = run_metrics

    def __call__(self, batch: pa.RecordBatch) -> pa.RecordBatch:
        iterations = batch.column("iteration").to_numpy()
        coefs = kl_coefs(self.metadata, self.run_metrics, np.unique(iterations).tolist())
        beta = np.array([np.nan if coefs[int(i)] is None else coefs[int(i)] for i in iterations], dtype=np.float64)
        columns = {name: batch.column(name) for name in batch.schema.names}
        columns["reward_components"] = _struct_of_map(batch.column("reward_components"), self.components)
        columns["kl_coef"] = pa.array(beta.astype(np.float32), mask=np.isnan(beta))
        columns["kl"] = _kl(batch.column("token_rewards"), batch.column("reward"), beta)
        return pa.RecordBatch.from_arrays([columns[f.name] for f in self.schema], schema=self.schema)


def _struct_of_map(maps: pa.MapArray, components: list[str]) -> pa.StructArray:
    """The map column as a struct of `components`; a key a row lacks is null there."""
    fields = list(archive_schema(components).field("reward_components").type)
    if not fields:
        return pa.array([None if m is None else {} for m in maps.to_pylist()], pa.struct([]))
    children = [pc.map_lookup(maps, pa.scalar(name), "first").cast(pa.float32()) for name in components]
    return pa.StructArray.from_arrays(children, fields=fields, mask=maps.is_null())


def _kl(token_rewards: pa.ListArray, reward: pa.Array, beta: np.ndarray) -> pa.ListArray:
    """kl_t = −(r_t − [t last]·score) / β per row; null where r, the score or β (or β = 0) is missing."""
    offsets = np.asarray(token_rewards.offsets).astype(np.int64)
    lengths = np.diff(offsets)
    values = token_rewards.values.to_numpy(zero_copy_only=False)[offsets[0] : offsets[-1]].astype(np.float64)
    score = reward.to_numpy(zero_copy_only=False).astype(np.float64)  # NaN where null
    has_last = lengths > 0
    last = (offsets[1:] - offsets[0] - 1)[has_last]
    values[last] -= score[has_last]
    with np.errstate(divide="ignore", invalid="ignore"):
        kl = -values / np.repeat(beta, lengths)
    missing = (
        token_rewards.is_null().to_numpy(zero_copy_only=False)
        | reward.is_null().to_numpy(zero_copy_only=False)
        | np.isnan(beta)
        | (beta == 0)
    )
    new_offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    return pa.ListArray.from_arrays(
        pa.array(new_offsets), pa.array(kl.astype(np.float32)), mask=pa.array(missing) if missing.any() else None
    )
