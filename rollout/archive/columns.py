"""Samples as Arrow columns, from the engines to the archive; no per-token Python objects on the way.

- A rollout worker turns its engine's completions into one `generation batch` (the engine columns
  of the archive schema), built from flat numpy buffers.
- A reward worker reads that batch's prompt ids and texts and returns a `reward batch` (`reward`,
  `reward_components`), one row per sample, in the same order.
- The learner's input (`SampleBatch`) is the generation batches' token buffers, concatenated,
  with the rewards; its output (`LearnerColumns`) is flat per-token buffers in the same order.
- The archive's record batches are the three joined column by column: list columns are built
  from offsets and value buffers, zero-copy.
"""

from __future__ import annotations

import datetime as dt

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from contracts.schema import REWARD_FIELDS, archive_schema
from learner.samples import LearnerColumns, SampleBatch, flatten

LEARNER_FIELDS = ("ref_logprobs", "values", "kl", "token_rewards", "advantages", "returns")  # per token
# What only the reward workers read, not archived: an agent's returned reward (archived as component `agent`)
# and whether the row takes its episode's reward (`env.params.reward_to`).
AGENT_FIELDS = (pa.field("agent_reward", pa.float32()), pa.field("takes_reward", pa.bool_(), nullable=False))
GENERATION_SCHEMA = pa.schema(
    [f for f in archive_schema(()) if f.name not in (*REWARD_FIELDS, *LEARNER_FIELDS, "kl_coef", "trained")]
    + list(AGENT_FIELDS)
)


def list_array(flat: np.ndarray, offsets: np.ndarray, kind: pa.ListType) -> pa.ListArray:
    """A list column from one value buffer and (N + 1,) offsets, without copying the values."""
    return pa.ListArray.from_arrays(
        pa.array(offsets.astype(np.int32, copy=False)), pa.array(flat, type=kind.value_type)
    )


def generation_batch(
    tasks, completions, *, run_id: str, iteration: int, policy_version: int, worker: str, generated_at: dt.datetime
) -> pa.RecordBatch:
    """One row per (task, completion), an agent's episode one per segment: `completions[i]` holds the
    engine's samples for `tasks[i]`."""
    pairs = [
        (task, i, row)
        for task, samples in zip(tasks, completions)
        for i, c in enumerate(samples)
        for row in (*c.earlier_segments, c)
    ]
    n = len(pairs)
    prompt_ids, prompt_offsets = flatten([c.prompt_ids or t.prompt_ids for t, _, c in pairs], np.int32)
    response_ids, response_offsets = flatten([c.token_ids for _, _, c in pairs], np.int32)
    logprobs, _ = flatten([c.logprobs for _, _, c in pairs], np.float32)
    field = GENERATION_SCHEMA.field
    if any(c.mask is not None for _, _, c in pairs):
        mask, _ = flatten([c.mask if c.mask is not None else [1] * len(c.token_ids) for _, _, c in pairs], np.uint8)
    else:
        mask = np.ones(len(response_ids), dtype=np.uint8)
    reward_at, reward_offsets = flatten([c.turn_reward_at for _, _, c in pairs], np.int32)
    resumed_at, resumed_offsets = flatten([c.resumed_at for _, _, c in pairs], np.int32)
    resumed_versions, _ = flatten([c.resumed_versions for _, _, c in pairs], np.int32)
    first = [policy_version if c.policy_version is None else c.policy_version for _, _, c in pairs]
    last = [c.resumed_versions[-1] if c.resumed_versions else v for (_, _, c), v in zip(pairs, first)]
    turn_rewards, _ = flatten([c.turn_rewards for _, _, c in pairs], np.float32)
    columns = {
        "run_id": pa.array([run_id] * n, pa.string()),
        "prompt_id": pa.array([t.prompt_id for t, _, _ in pairs], pa.string()),
        "iteration": pa.array(np.full(n, iteration, dtype=np.int32)),
        "policy_version": pa.array(np.array(first, dtype=np.int32)),
        "sample_index": pa.array(np.fromiter((i for _, i, _ in pairs), dtype=np.int32, count=n)),
        "prompt": pa.array([c.prompt or t.prompt for t, _, c in pairs], pa.string()),
        "response": pa.array([c.text for _, _, c in pairs], pa.string()),
        "prompt_ids": list_array(prompt_ids, prompt_offsets, field("prompt_ids").type),
        "response_ids": list_array(response_ids, response_offsets, field("response_ids").type),
        "response_logprobs": list_array(logprobs, response_offsets, field("response_logprobs").type),
        "finish_reason": pa.array([c.finish_reason for _, _, c in pairs], pa.string()),
        "worker": pa.array([worker] * n, pa.string()),
        "generated_at": pa.array([generated_at] * n, field("generated_at").type),
        "response_mask": list_array(mask, response_offsets, field("response_mask").type),
        "num_turns": pa.array(np.fromiter((c.num_turns for _, _, c in pairs), dtype=np.int32, count=n)),
        "final_turn": pa.array([c.text if c.final_text is None else c.final_text for _, _, c in pairs], pa.string()),
        "turn_reward_at": list_array(reward_at, reward_offsets, field("turn_reward_at").type),
        "turn_rewards": list_array(turn_rewards, reward_offsets, field("turn_rewards").type),
        "env_error": pa.array([c.env_error for _, _, c in pairs], pa.string()),
        "policy_version_last": pa.array(np.array(last, dtype=np.int32)),
        "resumed_at": list_array(resumed_at, resumed_offsets, field("resumed_at").type),
        "resumed_versions": list_array(resumed_versions, resumed_offsets, field("resumed_versions").type),
        "episode_id": pa.array([c.episode_id for _, _, c in pairs], pa.string()),
        "segment": pa.array(np.fromiter((c.segment for _, _, c in pairs), dtype=np.int32, count=n)),
        "agent_reward": pa.array([c.agent_reward for _, _, c in pairs], pa.float32()),
        "takes_reward": pa.array([c.takes_reward for _, _, c in pairs], pa.bool_()),
    }
    return pa.RecordBatch.from_arrays([columns[f.name] for f in GENERATION_SCHEMA], schema=GENERATION_SCHEMA)


def _values_and_offsets(column: pa.ListArray) -> tuple[np.ndarray, np.ndarray]:
    """A list column's values and offsets from 0, whatever slice of a larger array it is."""
    offsets = column.offsets.to_numpy().astype(np.int64)
    return column.flatten().to_numpy(zero_copy_only=False), offsets - offsets[0]


def _concat(batches: list[pa.RecordBatch], name: str) -> tuple[np.ndarray, np.ndarray]:
    values, offsets, base = [], [np.zeros(1, dtype=np.int64)], 0
    for batch in batches:
        v, o = _values_and_offsets(batch.column(name))
        values.append(v)
        offsets.append(o[1:] + base)
        base += int(o[-1])
    return np.concatenate(values) if values else np.zeros(0), np.concatenate(offsets)


def sample_batch(
    generations: list[pa.RecordBatch], rewards: list[pa.RecordBatch], selected: list[np.ndarray] | None = None
) -> SampleBatch:
    """The learner's input: the generation batches' tokens in order, with their rewards and prompt groups;
    `selected`: per batch, the rows the update may use (dynamic sampling; None: all)."""
    prompt_ids, prompt_offsets = _concat(generations, "prompt_ids")
    response_ids, response_offsets = _concat(generations, "response_ids")
    behaviour, _ = _concat(generations, "response_logprobs")
    scores = (
        np.concatenate([r.column("reward").to_numpy(zero_copy_only=False) for r in rewards])
        if rewards
        else np.zeros(0, dtype=np.float32)
    )
    ids = pa.chunked_array([g.column("prompt_id") for g in generations], pa.string())
    groups = pc.dictionary_encode(ids).combine_chunks().indices.to_numpy().astype(np.int64)
    mask, _ = _concat(generations, "response_mask")
    finish = pa.chunked_array([g.column("finish_reason") for g in generations], pa.string())
    return SampleBatch(
        prompt_ids.astype(np.int32, copy=False),
        prompt_offsets,
        response_ids.astype(np.int32, copy=False),
        response_offsets,
        behaviour.astype(np.float32, copy=False),
        scores.astype(np.float32, copy=False),
        groups,
        None if mask.all() else mask.astype(np.uint8, copy=False),
        _turn_rewards(generations, response_offsets),
        None if selected is None else np.concatenate(selected),
        pc.equal(finish, "length").to_numpy(zero_copy_only=False),
        np.concatenate([g.column("policy_version").to_numpy() for g in generations]).astype(np.int64)
        if generations
        else None,
    )


def _turn_rewards(generations: list[pa.RecordBatch], response_offsets: np.ndarray) -> np.ndarray | None:
    """Each sample's turn rewards placed on their tokens, in one flat (sum T_i,) buffer; None without any."""
    at, at_offsets = _concat(generations, "turn_reward_at")
    if len(at) == 0:
        return None
    values, _ = _concat(generations, "turn_rewards")
    rows = np.repeat(np.arange(len(at_offsets) - 1), np.diff(at_offsets))
    flat = np.zeros(int(response_offsets[-1]), dtype=np.float32)
    np.add.at(flat, response_offsets[rows] + at.astype(np.int64), values)
    return flat


def archive_batches(
    generations: list[pa.RecordBatch],
    rewards: list[pa.RecordBatch] | None,
    learner: LearnerColumns | None,
    components: tuple[str, ...],
) -> list[pa.RecordBatch]:
    """Generation, reward and learner columns joined into `archive_schema(components)` batches, one
    per generation batch.

    `learner`'s flat buffers cover all the generation batches' response tokens, in order; None (as in
    `rollout generate`) leaves the learner columns null, and so does `rewards` None for the reward columns.
    """
    schema = archive_schema(components)
    out, token_base, row_base = [], 0, 0
    for i, gen in enumerate(generations):
        columns = {name: gen.column(name) for name in GENERATION_SCHEMA.names}
        reward = rewards[i] if rewards is not None else None
        for name in REWARD_FIELDS:
            columns[name] = (
                reward.column(name) if reward is not None else pa.nulls(gen.num_rows, schema.field(name).type)
            )
        _, offsets = _values_and_offsets(gen.column("response_ids"))
        tokens = int(offsets[-1])
        for name in LEARNER_FIELDS:
            kind = schema.field(name).type
            if learner is None:
                columns[name] = pa.nulls(gen.num_rows, kind)
            else:
                flat = getattr(learner, name)[token_base : token_base + tokens]
                columns[name] = list_array(flat, offsets, kind)
        columns["kl_coef"] = (
            pa.nulls(gen.num_rows, pa.float32())
            if learner is None
            else pa.array(np.full(gen.num_rows, learner.kl_coef, dtype=np.float32))
        )
        if learner is None or learner.trained is None:
            columns["trained"] = pa.array(np.full(gen.num_rows, learner is not None, dtype=bool))
        else:
            columns["trained"] = pa.array(learner.trained[row_base : row_base + gen.num_rows])
        row_base += gen.num_rows
        token_base += tokens
        out.append(pa.RecordBatch.from_arrays([columns[n] for n in schema.names], schema=schema))
    if learner is not None and token_base != len(learner.returns):
        raise ValueError(f"the learner returned {len(learner.returns)} token values for {token_base} response tokens")
    return out
