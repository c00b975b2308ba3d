"""Dynamic sampling's selection and round sizes, and the rows an update trains on (selected, less the
truncated ones with learner.mask_truncated), against hand-worked examples."""

import numpy as np
import pyarrow as pa
import pytest
import torch
from test_learner import learner_for, make_records

from contracts.config.load import load_config
from learner.samples import SampleBatch
from rollout.driver.dynamic_sampling import round_size, select


def rewards(*values):
    return pa.record_batch({"reward": pa.array(values, pa.float32())})


def test_the_first_groups_with_a_signal_are_kept_and_those_without_are_counted():
    # n = 2: chunk 0 holds groups (1, 1) no signal, (0, 1) signal; chunk 1: (0, 0) no, (1, 0) yes, (.5, .2) yes
    chunks = [rewards(1, 1, 0, 1), rewards(0, 0, 1, 0, 0.5, 0.2)]
    s = select(chunks, n=2, wanted=2)
    assert (s.kept, s.filtered) == (2, 2)
    assert [rows.tolist() for rows in s.rows] == [[False, False, True, True], [False, False, True, True, False, False]]
    s = select(chunks, n=2, wanted=10)  # fewer than wanted: every group with a signal
    assert (s.kept, s.filtered) == (3, 2)
    assert s.rows[1].tolist() == [False, False, True, True, True, True]


def test_a_failed_score_is_not_a_signal():
    nan = float("nan")
    s = select([rewards(nan, 1, nan, nan, 0, 1)], n=2, wanted=3)  # (nan, 1) and (nan, nan): no signal
    assert (s.kept, s.filtered) == (1, 2)
    assert s.rows[0].tolist() == [False, False, False, False, True, True]


@pytest.mark.parametrize(
    ("needed", "kept", "groups", "limit", "size"),
    [
        (4, 2, 8, 100, 16),  # 2 of 8 had a signal: 4 / 0.25
        (4, 2, 8, 10, 10),  # no more than the prompts left
        (4, 0, 8, 100, 40),  # none yet: one in ten assumed
        (1, 8, 8, 100, 1),
        (3, 1, 3, 100, 9),  # ceil(3 / (1/3))
    ],
)
def test_round_sizes(needed, kept, groups, limit, size):
    assert round_size(needed, kept, groups, limit) == size


def test_trained_rows_are_the_selected_less_the_truncated_when_masked():
    records = make_records(4)
    records[1].finish_reason = records[3].finish_reason = "length"
    batch = SampleBatch.from_records(records)
    assert batch.truncated.tolist() == [False, True, False, True]
    assert batch.trained_rows(mask_truncated=False).tolist() == [True] * 4
    assert batch.trained_rows(mask_truncated=True).tolist() == [True, False, True, False]
    batch.selected = np.array([True, True, False, False])
    assert batch.trained_rows(mask_truncated=True).tolist() == [True, False, False, False]


def test_an_update_with_rows_left_out_equals_the_update_on_the_rest(tiny_model_path):
    """mask_truncated and a selection leave rows out of the loss, the whitening and the minibatches: the
    step equals one on a batch of the other rows alone (gae: a sample's advantages are its own)."""
    records = make_records(24, seed=7)
    for i in (1, 4, 9, 15):
        records[i].finish_reason = "length"
    left_out = {1, 4, 9, 15, 20, 21}  # truncated, and two rows a selection leaves out
    settings = ["learner.device=cpu", "learner.minibatch_size=32", "learner.ppo_epochs=1", "learner.lr=1e-4"]
    cfg = load_config(None, [*settings, "learner.mask_truncated=true"])
    full = learner_for(cfg, tiny_model_path)
    batch = SampleBatch.from_records(records)
    batch.selected = np.array([i not in (20, 21) for i in range(len(records))])
    columns, stats, _ = full.learn(batch)
    assert stats["trained_samples"] == 18
    assert columns.trained.tolist() == [i not in left_out for i in range(len(records))]

    rest = learner_for(cfg, tiny_model_path)
    _, rest_stats, _ = rest.learn(SampleBatch.from_records([r for i, r in enumerate(records) if i not in left_out]))
    assert stats["grad_norm"] == pytest.approx(rest_stats["grad_norm"], rel=1e-5)
    w1, w2 = dict(full.export_weights()), dict(rest.export_weights())
    assert max((w1[k] - w2[k]).abs().max().item() for k in w1) < 1e-5
    moved = dict(learner_for(cfg, tiny_model_path).export_weights())
    assert max((w1[k] - moved[k]).abs().max().item() for k in w1) > 1e-5  # it did take a step
    assert torch.isfinite(torch.tensor(stats["policy_loss"]))
