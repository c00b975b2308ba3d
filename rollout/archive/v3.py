"""Schema v3 archives (and earlier ones, once converted to v3), read as v4: every sample generated whole by
one version of the weights, no agent episode's segments.

Version 4 added `policy_version_last`, `resumed_at` and `resumed_versions` (partial rollouts) and
`episode_id` and `segment` (an agent's episode in several rows). A v3 sample's tokens all came from its
`policy_version`, it was never resumed, and it is segment 0 of no agent episode.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from contracts.schema import V4_FIELDS

V4_NAMES = tuple(f.name for f in V4_FIELDS)


def is_before_v4(schema: pa.Schema) -> bool:
    return "policy_version_last" not in schema.names


def version_columns(batch: pa.RecordBatch) -> dict[str, pa.Array]:
    """The v4 columns of a v3 batch, by name."""
    n = batch.num_rows
    empty = pa.array(np.zeros(n + 1, dtype=np.int32))
    return {
        "policy_version_last": batch.column("policy_version"),
        "resumed_at": pa.ListArray.from_arrays(empty, pa.array([], pa.int32())),
        "resumed_versions": pa.ListArray.from_arrays(empty, pa.array([], pa.int32())),
        "episode_id": pa.nulls(n, pa.string()),
        "segment": pa.array(np.zeros(n, dtype=np.int32)),
    }
