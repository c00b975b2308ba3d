"""GSPO's sequence-level ratio, the rollout corrections and the train-inference mismatch figures, against
hand-worked values; then in the learner, with a known mismatch injected into the engine's logprobs."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch
from test_learner import learner_for, make_records

from contracts.config import LearnerConfig
from contracts.config.load import explain, load_config
from learner.losses import mismatch, policy_loss, rollout_correction

# Two rows: row 0 three tokens with ratios 1.5, 0.5, 0.5 (geometric mean 0.375^(1/3) = 0.7211), row 1 one
# token with ratio 1.5, then padding. A sequence-level advantage on every token.
OLD = torch.tensor([[-1.0, -2.0, -0.7], [-0.3, -1.0, -1.0]])
RATIOS = torch.tensor([[1.5, 0.5, 0.5], [1.5, 1.0, 1.0]])
MASK = torch.tensor([[1, 1, 1], [1, 0, 0]])
GEO0 = 0.375 ** (1 / 3)


def gspo(**fields) -> LearnerConfig:
    return LearnerConfig(ratio_level="sequence", **{"clip_eps": 0.2, **fields})


@pytest.mark.parametrize(
    ("a0", "a1", "per_token", "clipped"),
    [
        # A=+1 on s=0.7211: max(−0.7211, −0.8) = −0.7211, unclipped (a low ratio is not clipped for A > 0);
        # A=−1 on s=1.5: max(1.5, 1.2) = 1.5, unclipped.
        (1.0, -1.0, (-GEO0, 1.5), 0),
        # A=−1 on s=0.7211: max(0.7211, 0.8) = 0.8, clipped; A=+1 on s=1.5: max(−1.5, −1.2) = −1.2, clipped.
        (-1.0, 1.0, (0.8, -1.2), 2),
    ],
)
def test_gspo_ratio_is_the_sequences_geometric_mean_clipped_at_sequence_level(a0, a1, per_token, clipped):
    logprobs = (OLD + RATIOS.log()).requires_grad_()
    advantages = torch.tensor([[a0, a0, a0], [a1, a1, a1]])
    loss, stats = policy_loss(logprobs, OLD, advantages, MASK, gspo())
    # token_mean: the four valid tokens, row 0's three with its loss and row 1's one
    assert loss.item() == pytest.approx((3 * per_token[0] + per_token[1]) / 4)
    assert stats["clipped_sequences"].item() == clipped
    assert stats["clip_frac"].item() == pytest.approx({0: 0, 2: 1}[clipped])
    loss.backward()
    # GSPO-token: ∂L/∂log π_t = −A·s_i / N where unclipped, 0 where clipped; every token of a row alike.
    expected = torch.zeros(2, 3)
    if not clipped:
        expected[0] = -a0 * GEO0 / 4
        expected[1, 0] = -a1 * 1.5 / 4
    torch.testing.assert_close(logprobs.grad, expected)


def test_token_level_stays_ppo():
    logprobs = (OLD + RATIOS.log()).requires_grad_()
    advantages = torch.ones(2, 3)
    by_token, _ = policy_loss(logprobs, OLD, advantages, MASK, LearnerConfig(clip_eps=0.2))
    # max(−1.5, −1.2), max(−0.5, −0.8) twice, max(−1.5, −1.2): the PPO token losses
    assert by_token.item() == pytest.approx((-1.2 - 0.5 - 0.5 - 1.2) / 4)


def test_gspo_small_clip_range_clips_a_sequence_whose_mean_ratio_moves_slightly():
    old = torch.zeros(1, 2)
    logprobs = torch.tensor([[2e-3, 0.0]])  # log s = (2e-3 + 0) / 2 = 1e-3 > log(1 + 4e-4)
    loss, stats = policy_loss(
        logprobs, old, torch.ones(1, 2), torch.ones(1, 2), gspo(clip_eps=3e-4, clip_eps_high=4e-4)
    )
    assert loss.item() == pytest.approx(-(1 + 4e-4))
    assert stats["clipped_sequences"].item() == 1


# log ρ = log π_old − log π_behaviour injected: row 0 ratios 3, 1, 0.25 (product 0.75, geometric mean
# 0.75^(1/3) = 0.9086); row 1 ratios 1.2, 1.5 (product 1.8, geometric mean 1.3416); row 2 ratio 2.5 alone.
LOG_RATIO = torch.tensor([[3.0, 1.0, 0.25], [1.2, 1.5, 1.0], [2.5, 1.0, 1.0]]).log()
KEEP = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 0, 0]]).bool()


@pytest.mark.parametrize(
    ("mode", "weights", "affected"),
    [
        # min(ρ_t, 2)
        ("token_tis", [[2.0, 1.0, 0.25], [1.2, 1.5, 0], [2.0, 0, 0]], [[1, 0, 0], [0, 0, 0], [1, 0, 0]]),
        # min(Π ρ, 2) on every token: 0.75, 1.8, min(2.5, 2)
        ("sequence_tis", [[0.75] * 3, [1.8, 1.8, 0], [2.0, 0, 0]], [[0, 0, 0], [0, 0, 0], [1, 0, 0]]),
        # 1 inside [0.5, 2]
        ("token_mask", [[0, 1, 0], [1, 1, 0], [0, 0, 0]], [[1, 0, 1], [0, 0, 0], [1, 0, 0]]),
        # geometric means 0.9086 and 1.3416 inside, 2.5 outside
        ("sequence_mask", [[1, 1, 1], [1, 1, 0], [0, 0, 0]], [[0, 0, 0], [0, 0, 0], [1, 0, 0]]),
    ],
)
def test_rollout_correction_weights_by_hand(mode, weights, affected):
    w, hit = rollout_correction(LOG_RATIO, KEEP, mode, 0.5, 2.0)
    torch.testing.assert_close(w, torch.tensor(weights, dtype=torch.float32))
    assert hit.tolist() == torch.tensor(affected).bool().tolist()


def test_no_correction_has_no_weights():
    w, hit = rollout_correction(LOG_RATIO, KEEP, "none", 0.5, 2.0)
    assert w is None and not hit.any()


def test_mismatch_figures_by_hand():
    figures = mismatch(LOG_RATIO, KEEP)
    tokens = [3.0, 1.0, 0.25, 1.2, 1.5, 2.5]
    k3 = sum(r - 1 - math.log(r) for r in tokens) / 6
    assert figures["kl"].item() == pytest.approx(k3)
    assert figures["log_ratio_abs_max"].item() == pytest.approx(math.log(4))
    # per sequence exp(−mean_t log ρ): 0.75^(−1/3), 1.8^(−1/2), 1 / 2.5
    ppl = (0.75 ** (-1 / 3) + 1.8 ** (-1 / 2) + 1 / 2.5) / 3
    assert figures["ppl_ratio"].item() == pytest.approx(ppl)
    assert figures["tokens"].item() == 6
    assert mismatch(LOG_RATIO, torch.zeros_like(KEEP))["tokens"].item() == 0


def test_an_old_configs_behaviour_is_cap_is_mapped_with_a_note(capsys):
    assert load_config(None, []).learner.rollout_correction.mode == "token_tis"
    assert load_config(None, []).learner.rollout_correction.upper == 2.0
    assert load_config(None, []).learner.rollout_correction.lower_bound == 0.5
    capsys.readouterr()
    capped = load_config(None, ["learner.behaviour_is_cap=3.0"]).learner.rollout_correction
    assert (capped.mode, capped.upper) == ("token_tis", 3.0)
    assert "behaviour_is_cap 3.0 is now learner.rollout_correction" in capsys.readouterr().err
    assert load_config(None, ["learner.behaviour_is_cap=null"]).learner.rollout_correction.mode == "none"


def test_explained():
    text = "\n".join(explain())
    for field in ("learner.ratio_level", "learner.rollout_correction.mode", "learner.rollout_correction.lower"):
        assert field in text, field


def injected(learner, records, log_ratio: float):
    """The batch of `records` with the engine's logprobs set to the learner's own less `log_ratio`: a known
    mismatch log π_old − log π_behaviour = log_ratio on every token."""
    from learner.samples import SampleBatch

    batch = SampleBatch.from_records(records)
    old = learner.evaluate(batch).old_logprobs
    batch.behaviour_logprobs = (batch.flat(old) - log_ratio).astype(np.float32)
    return batch


@pytest.mark.parametrize(
    ("mode", "figure", "share"),
    [
        ("token_tis", "rollout_correction/capped_tokens", 1.0),  # ρ = 3 > 2 everywhere
        ("sequence_tis", "rollout_correction/capped_sequences", 1.0),
        ("token_mask", "rollout_correction/masked_tokens", 1.0),
        ("sequence_mask", "rollout_correction/masked_sequences", 1.0),
    ],
)
def test_learner_reports_the_injected_mismatch_and_corrects_it(tiny_model_path, mode, figure, share):
    cfg = load_config(
        None,
        [
            "learner.device=cpu",
            "learner.minibatch_size=16",
            "learner.ppo_epochs=1",
            f"learner.rollout_correction.mode={mode}",
        ],
    )
    learner = learner_for(cfg, tiny_model_path)
    records = [r for r in make_records(16, seed=11) if r.response_ids]
    _, stats, _ = learner.learn(injected(learner, records, math.log(3.0)))
    assert stats["mismatch/kl"] == pytest.approx(2 - math.log(3), rel=1e-4)  # (3 − 1) − log 3
    assert stats["mismatch/log_ratio_abs_max"] == pytest.approx(math.log(3), rel=1e-4)
    assert stats["mismatch/ppl_ratio"] == pytest.approx(1 / 3, rel=1e-4)
    assert stats[figure] == share
    if mode.endswith("mask"):  # every token masked: no loss, no gradient
        assert stats["grad_norm"] == 0.0


def test_mismatch_is_measured_over_the_current_weights_samples_only(tiny_model_path):
    cfg = load_config(None, ["learner.device=cpu", "learner.minibatch_size=16", "learner.ppo_epochs=1"])
    learner = learner_for(cfg, tiny_model_path)
    records = [r for r in make_records(16, seed=12) if r.response_ids]
    batch = injected(learner, records, math.log(3.0))
    batch.policy_versions = np.full(len(batch), 7)  # drawn with other weights than the learner's (version 0)
    _, stats, _ = learner.learn(batch)
    assert not any(k.startswith("mismatch/") for k in stats)


def test_replay_trains_with_gspo_and_a_rollout_correction(tmp_path, capsys, monkeypatch, tiny_model_path):
    """`rollout replay --train --ratio-level sequence --rollout-correction sequence_mask`: the update takes
    its policy loss at sequence level and its weights from that mode, and says how many sequences clipped."""
    from test_replay import fill_learner_columns, sample, write_run

    import learner.learner as learner_module
    from rollout.cli import main

    seen = []

    def spy(name, fn, setting):
        def wrapped(*args, **kwargs):
            seen.append((name, setting(args)))
            return fn(*args, **kwargs)

        monkeypatch.setattr(learner_module, name, wrapped)

    spy("policy_loss", learner_module.policy_loss, lambda args: args[4].ratio_level)
    spy("rollout_correction", learner_module.rollout_correction, lambda args: args[2])
    gen = torch.Generator().manual_seed(3)
    records = [sample(0, f"p{i // 4}", i % 4, 3, float(i % 2), gen=gen) for i in range(8)]
    fill_learner_columns(records, kl_coef=0.05, estimator="k1", gamma=1.0, lam=0.95, gen=gen)
    run = write_run(tmp_path / "run", records)
    training = ["--ratio-level", "sequence", "--rollout-correction", "sequence_mask"]
    args = ["replay", str(run), "--out", str(tmp_path / "out"), "--estimator", "grpo", "--train"]
    assert main([*args, "--model", tiny_model_path, *training]) == 0
    assert re.search(r"clipped sequences [\d.]+", capsys.readouterr().err)
    assert {s for s in seen if s[0] == "policy_loss"} == {("policy_loss", "sequence")}
    assert {s for s in seen if s[0] == "rollout_correction"} == {("rollout_correction", "sequence_mask")}


def test_stats_show_clipped_sequences_and_the_mismatch(tmp_path):
    from test_stats import hand_records, write

    from rollout.offline.stats import compute_stats
    from rollout.offline.stats_view import format_table

    metrics = [
        {"iteration": 0, "clip_frac": 0.2, "clipped_sequences": 0.5, "mismatch/kl": 2e-13},
        {"iteration": 1, "clip_frac": 0.1, "clipped_sequences": 0.25, "mismatch/kl": 4e-13},
    ]
    stats = compute_stats(write(tmp_path / "run", hand_records(), metrics))
    assert stats.totals["clipped_sequences"] == pytest.approx(0.375)
    assert stats.totals["mismatch/kl"] == pytest.approx(3e-13)
    header = format_table(stats).splitlines()[1].split()
    assert header[-4:] == ["clip", "seq", "mismatch", "kl"]
