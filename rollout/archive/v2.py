"""Schema v2 archives (and v1 ones, once converted to v2), read as v3: every sample a single completion.

Version 3 added the columns of an episode and `trained`. A v2 sample is one completion the model wrote
whole, so its `response_mask` is all ones, `num_turns` 1, `final_turn` the response, no turn rewards,
no environment error; it was trained on when the run's learner filled its columns.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from contracts.schema import EPISODE_FIELDS

V3_NAMES = tuple(f.name for f in EPISODE_FIELDS)


def is_before_v3(schema: pa.Schema) -> bool:
    return "response_mask" not in schema.names


def episode_columns(batch: pa.RecordBatch) -> dict[str, pa.Array]:
    """The v3 columns of a v2 batch, by name."""
    responses = batch.column("response_ids")
    offsets = responses.offsets.to_numpy().astype(np.int64)
    offsets -= offsets[0]
    n = batch.num_rows
    empty = pa.array(np.zeros(n + 1, dtype=np.int32))
    fields = {f.name: f for f in EPISODE_FIELDS}
    return {
        "response_mask": pa.ListArray.from_arrays(
            pa.array(offsets.astype(np.int32)), pa.array(np.ones(int(offsets[-1]), dtype=np.uint8))
        ),
        "num_turns": pa.array(np.ones(n, dtype=np.int32)),
        "final_turn": batch.column("response"),
        "turn_reward_at": pa.ListArray.from_arrays(empty, pa.array([], pa.int32())),
        "turn_rewards": pa.ListArray.from_arrays(empty, pa.array([], pa.float32())),
        "env_error": pa.nulls(n, fields["env_error"].type),
        "trained": pc.invert(pc.is_null(batch.column("advantages"))),
    }
