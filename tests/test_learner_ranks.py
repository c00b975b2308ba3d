"""Learner ranks on a local Ray: FSDP2 over gloo gives the one-rank update, and resumes exactly."""

import re

import numpy as np
import pytest
import ray
import torch
from test_learner import make_records

from contracts.config.load import load_config
from learner.samples import SampleBatch
from rollout.actors.learner_ranks import LearnerRanks
from rollout.actors.learner_spec import LearnerSpec

# One optimizer step per update (see test_micro_batched_update_equals_the_whole_minibatch_update).
ONE_STEP = [
    "learner.device=cpu",
    "learner.minibatch_size=32",
    "learner.ppo_epochs=1",
    "learner.lr=1e-4",
    "learner.micro_batch_tokens=64",
    "rollout.sampling.temperature=0.8",
]


def group(tiny_model_path, ranks, *extra):
    cfg = load_config(None, [*ONE_STEP, f"learner.num_ranks={ranks}", *extra])
    return LearnerRanks(LearnerSpec.of_job(cfg, tiny_model_path), cfg.ray)


def learn_and_export(learners, batch):
    _, stats, _ = learners.learn_samples(batch)
    return exported(learners), stats


def exported(learners):
    return dict(ray.get(learners.weights_ref(), timeout=120))


# The objectives of reasoning-model training, all at once: GRPO without the std, Dr. GRPO's aggregation,
# clip-higher, truncated samples and a selection (dynamic sampling) left out.
DAPO = [
    "learner.estimator=grpo",
    "learner.grpo_normalize_std=false",
    "learner.loss_agg_mode=seq_mean_token_sum_norm",
    "learner.clip_eps_high=0.28",
    "learner.mask_truncated=true",
]


def dapo_batch():
    records = make_records(32, seed=5)
    for i, record in enumerate(records):
        record.prompt_id = f"group-{i // 4}"
        record.finish_reason = "length" if i % 7 == 3 else "stop"
    batch = SampleBatch.from_records(records)
    batch.selected = np.array([i // 4 != 2 for i in range(len(records))])  # group 2 filtered
    return batch


# GSPO's sequence ratio with its small clip range over two epochs (the second's ratios move, some clip), and
# sequences masked by their mismatch with the engine.
GSPO = [
    "learner.estimator=grpo",
    "learner.ratio_level=sequence",
    "learner.clip_eps=3e-4",
    "learner.clip_eps_high=4e-4",
    "learner.ppo_epochs=2",
    "learner.minibatch_size=16",
    "learner.rollout_correction.mode=sequence_mask",
    "learner.rollout_correction.lower=0.01",
]


def gspo_batch():
    """Groups of 4; half the rows' engine logprobs near the learner's (log 1/300), half far from them."""
    records = make_records(32, seed=5)
    for i, record in enumerate(records):
        record.prompt_id = f"group-{i // 4}"
        record.response_logprobs = [-1.0 if i % 2 else -5.5] * len(record.response_ids)
    return SampleBatch.from_records(records)


OBJECTIVES = {"default": ([], lambda: SampleBatch.from_records(make_records(32, seed=5))), "dapo": (DAPO, dapo_batch)}
OBJECTIVES["gspo"] = (GSPO, gspo_batch)


@pytest.mark.parametrize("objectives", list(OBJECTIVES))
def test_two_ranks_give_the_one_rank_update(local_ray, tiny_model_path, objectives):
    dapo = objectives == "dapo"
    settings, make_batch = OBJECTIVES[objectives]
    batch = make_batch()
    results = []
    for ranks in (1, 2):
        learners = group(tiny_model_path, ranks, *settings)
        try:
            columns, stats, _ = learners.learn_samples(batch)
            results.append((exported(learners), learners.updates, columns, stats))
        finally:
            learners.release()
    (w1, v1, c1, s1), (w2, v2, c2, s2) = results
    for name in ("clipped_sequences", "rollout_correction/masked_sequences", "mismatch/kl", "mismatch/ppl_ratio"):
        if name in s1:
            assert s2[name] == pytest.approx(s1[name], abs=1e-5), name
    if objectives == "gspo":
        assert 0 < s1["rollout_correction/masked_sequences"] < 1 and s1["clipped_sequences"] > 0, s1
    assert v1 == v2 == 1
    np.testing.assert_allclose(c2.advantages, c1.advantages, atol=1e-5)
    np.testing.assert_allclose(c2.values, c1.values, atol=1e-6)
    assert w1.keys() == w2.keys()
    moved = max((w1[k] - w2[k]).abs().max().item() for k in w1)
    assert moved < 1e-5
    if dapo:  # 32 rows less group 2 (rows 8-11) and the truncated 3, 17, 24, 31 (10 is in group 2)
        assert c1.trained.tolist() == c2.trained.tolist() and int(c1.trained.sum()) == 32 - 4 - 4


def test_two_ranks_stopped_and_resumed_continue_exactly(local_ray, tiny_model_path, tmp_path):
    first, second = (SampleBatch.from_records(make_records(32, seed=s)) for s in (6, 7))
    learners = group(tiny_model_path, 2, "learner.ppo_epochs=2", "learner.minibatch_size=8")
    try:
        learners.learn_samples(first)
        learners.save(tmp_path / "ckpt", {"iteration": 0})
        straight, straight_stats = learn_and_export(learners, second)
    finally:
        learners.release()
    resumed = group(tiny_model_path, 2, "learner.ppo_epochs=2", "learner.minibatch_size=8")
    try:
        assert resumed.load(tmp_path / "ckpt") == {"iteration": 0}
        again, again_stats = learn_and_export(resumed, second)
    finally:
        resumed.release()
    assert again_stats == straight_stats
    for name in straight:
        assert torch.equal(straight[name], again[name]), name


def test_a_learner_that_cannot_be_placed_says_so_while_it_waits_then_fails_naming_what_is_free(
    local_ray, monkeypatch, capsys
):
    from rollout.runtime import placement

    monkeypatch.setattr(placement, "NOTE_S", 0.5)
    cfg = load_config(None, ["learner.num_cpus_per_rank=64", "ray.actor_start_timeout_s=2"])
    from rollout.runtime.failures import ActorStartError

    with pytest.raises(ActorStartError, match=r"could not be placed within ray.actor_start_timeout_s \(2s\)"):
        LearnerRanks(LearnerSpec.of_job(cfg, "unused: never loaded"), cfg.ray)
    notes = [line for line in capsys.readouterr().err.splitlines() if "not started yet" in line]
    assert notes and notes[0].startswith("the learner's 1 rank(s): not started yet (")
    assert re.search(r"of ray.actor_start_timeout_s 2s\); the cluster has [\d.]+ CPU free", notes[0]), notes
