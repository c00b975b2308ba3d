"""Samples as columns: engine output -> generation batch -> learner input -> archive batches, row for row."""

import datetime as dt

import numpy as np
import pyarrow as pa

from contracts.schema import archive_schema, from_record_batch, reward_batch
from learner.samples import LearnerColumns
from reward.scorer import RewardResult
from rollout.archive.columns import GENERATION_SCHEMA, archive_batches, generation_batch, sample_batch
from rollout.generation.completions import Completion

COMPONENTS = ("a", "b")
from contracts.rendering import PromptTask

NOW = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)


def engine_output(prompts, n, seed):
    rng = np.random.default_rng(seed)
    tasks = [
        PromptTask(prompt_id=f"p{seed}-{i}", prompt=f"prompt {i}", prompt_ids=list(range(1, 3 + i)))
        for i in range(prompts)
    ]
    completions = [
        [
            Completion(
                token_ids=rng.integers(5, 100, int(rng.integers(0, 6))).tolist(),
                logprobs=[],
                text=f"r{i}.{k}",
                finish_reason="stop",
            )
            for k in range(n)
        ]
        for i in range(prompts)
    ]
    for samples in completions:
        for c in samples:
            c.logprobs = (-rng.random(len(c.token_ids))).tolist()
    return tasks, completions


def test_a_generation_batch_holds_every_completion_with_its_tokens_and_logprobs():
    tasks, completions = engine_output(3, 2, seed=0)
    batch = generation_batch(
        tasks, completions, run_id="r", iteration=4, policy_version=2, worker="w", generated_at=NOW
    )
    assert batch.schema == GENERATION_SCHEMA
    rows = from_record_batch(batch)
    assert [(r.prompt_id, r.sample_index) for r in rows] == [(t.prompt_id, k) for t in tasks for k in range(2)]
    flat = [c for samples in completions for c in samples]
    for row, task, c in zip(rows, [t for t in tasks for _ in range(2)], flat):
        assert row.prompt_ids == task.prompt_ids and row.response_ids == c.token_ids
        assert np.allclose(row.response_logprobs, c.logprobs) and row.response == c.text
        assert (row.iteration, row.policy_version, row.worker, row.reward) == (4, 2, "w", None)


def test_learner_input_and_archive_rows_line_up_across_batches_and_slices():
    generations, rewards = [], []
    for seed in range(3):
        tasks, completions = engine_output(4, 2, seed)
        batch = generation_batch(
            tasks, completions, run_id="r", iteration=0, policy_version=0, worker="w", generated_at=NOW
        )
        generations.append(batch.slice(1) if seed == 1 else batch)  # a slice: offsets not starting at 0
        rewards.append(
            reward_batch(
                [
                    RewardResult(total=float(i), components={"a": float(i), "b": 0.5}, failed=[])
                    for i in range(generations[-1].num_rows)
                ],
                COMPONENTS,
            )
        )
    samples = sample_batch(generations, rewards)
    rows = [r for g in generations for r in from_record_batch(g)]
    assert len(samples) == len(rows)
    for i, row in enumerate(rows):
        lo, hi = samples.response_offsets[i], samples.response_offsets[i + 1]
        assert samples.response_ids[lo:hi].tolist() == row.response_ids
        assert np.allclose(samples.behaviour_logprobs[lo:hi], row.response_logprobs)
        assert samples.prompt_ids[samples.prompt_offsets[i] : samples.prompt_offsets[i + 1]].tolist() == row.prompt_ids
    # Samples of one prompt share a group; other prompts do not.
    ids = [r.prompt_id for r in rows]
    assert all(
        (samples.groups[i] == samples.groups[j]) == (ids[i] == ids[j]) for i in range(len(ids)) for j in range(len(ids))
    )

    tokens = len(samples.response_ids)
    learner = LearnerColumns(*(np.arange(tokens, dtype=np.float32) + k for k in range(7)), kl_coef=0.125)
    archived = [r for b in archive_batches(generations, rewards, learner, COMPONENTS) for r in from_record_batch(b)]
    for i, (row, original) in enumerate(zip(archived, rows)):
        lo, hi = samples.response_offsets[i], samples.response_offsets[i + 1]
        assert row.response_ids == original.response_ids
        assert row.returns == learner.returns[lo:hi].tolist()
        assert row.ref_logprobs == learner.ref_logprobs[lo:hi].tolist()
        assert row.kl == learner.kl[lo:hi].tolist() and row.kl_coef == 0.125
        assert row.reward == samples.scores[i] and row.reward_components == {"a": row.reward, "b": 0.5}


def test_generate_archives_leave_learner_and_missing_reward_columns_null():
    tasks, completions = engine_output(2, 1, seed=5)
    batch = generation_batch(
        tasks, completions, run_id="r", iteration=0, policy_version=0, worker="w", generated_at=NOW
    )
    [archived] = archive_batches([batch], None, None, COMPONENTS)
    assert archived.schema == archive_schema(COMPONENTS)
    for name in ("reward", "reward_components", "values", "kl", "kl_coef", "returns"):
        assert archived.column(name).null_count == archived.num_rows
    assert isinstance(archived.column("response_ids"), pa.ListArray)
