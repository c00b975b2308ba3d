"""PPO policy and value losses, entropies and token log-probabilities against hand-worked values."""

from __future__ import annotations

import math

import pytest
import torch

from contracts.config import ConfigError, LearnerConfig
from learner.losses import policy_loss, value_loss

EPS = 0.2

# Four tokens covering each side of the clip, laid out as a 3-row batch of unequal lengths:
#   row 0: (A=+1, ρ=1.5), (A=+1, ρ=0.5), (A=−1, ρ=0.5);  row 1: (A=−1, ρ=1.5), pad, pad
#   row 2: empty
# Per token L = max(−A·ρ, −A·clip(ρ, 0.8, 1.2)):
#   A=+1, ρ=1.5: max(−1.5, −1.2) = −1.2  clipped term active
#   A=+1, ρ=0.5: max(−0.5, −0.8) = −0.5  unclipped (a low ratio is not clipped for A > 0)
#   A=−1, ρ=0.5: max( 0.5,  0.8) =  0.8  clipped term active
#   A=−1, ρ=1.5: max( 1.5,  1.2) =  1.5  unclipped (a high ratio is not clipped for A < 0)
RATIOS = torch.tensor([[1.5, 0.5, 0.5], [1.5, 1.0, 1.0], [1.0, 1.0, 1.0]])
ADVANTAGES = torch.tensor([[1.0, 1.0, -1.0], [-1.0, 7.0, 7.0], [3.0, 3.0, 3.0]])
MASK = torch.tensor([[1, 1, 1], [1, 0, 0], [0, 0, 0]])
OLD_LOGPROBS = torch.tensor([[-1.0, -2.0, -0.7], [-0.3, -1.0, -1.0], [-1.0, -1.0, -1.0]])


AGG = {"token": "token_mean", "sequence": "seq_mean_token_mean"}


def settings(agg: str = "token", **fields) -> LearnerConfig:
    return LearnerConfig(clip_eps=EPS, loss_agg_mode=AGG.get(agg, agg), **fields)


def logprobs_for(ratios: torch.Tensor) -> torch.Tensor:
    return (OLD_LOGPROBS + ratios.log()).requires_grad_()


def test_policy_loss_token_mean_hand_values() -> None:
    logprobs = logprobs_for(RATIOS)
    loss, stats = policy_loss(logprobs, OLD_LOGPROBS, ADVANTAGES, MASK, settings("token"))
    assert loss.item() == pytest.approx((-1.2 - 0.5 + 0.8 + 1.5) / 4)  # 0.15
    assert stats["clip_frac"].item() == pytest.approx(2 / 4)
    # k3 per token: ρ=1.5 gives 0.5 − ln 1.5; ρ=0.5 gives −0.5 + ln 2; two of each
    k3 = (0.5 - math.log(1.5)) + (-0.5 + math.log(2))
    assert stats["approx_kl"].item() == pytest.approx(2 * k3 / 4)
    assert all(value.dim() == 0 and not value.requires_grad for value in stats.values())


def test_policy_loss_sequence_mean_hand_values() -> None:
    loss, _ = policy_loss(logprobs_for(RATIOS), OLD_LOGPROBS, ADVANTAGES, MASK, settings("sequence"))
    # row 0: (−1.2 − 0.5 + 0.8) / 3 = −0.3; row 1: 1.5; the empty row 2 does not count
    assert loss.item() == pytest.approx((-0.3 + 1.5) / 2)


def test_token_and_sequence_aggregation_differ_on_unequal_lengths_only() -> None:
    logprobs = logprobs_for(RATIOS)
    by_token, _ = policy_loss(logprobs, OLD_LOGPROBS, ADVANTAGES, MASK, settings("token"))
    by_sequence, _ = policy_loss(logprobs, OLD_LOGPROBS, ADVANTAGES, MASK, settings("sequence"))
    assert by_token.item() != pytest.approx(by_sequence.item())
    full = torch.ones(3, 3)
    by_token, _ = policy_loss(logprobs, OLD_LOGPROBS, ADVANTAGES, full, settings("token"))
    by_sequence, _ = policy_loss(logprobs, OLD_LOGPROBS, ADVANTAGES, full, settings("sequence"))
    assert by_token.item() == pytest.approx(by_sequence.item())


def test_policy_gradient_is_cut_exactly_where_the_clip_is_active() -> None:
    logprobs = logprobs_for(RATIOS)
    loss, _ = policy_loss(logprobs, OLD_LOGPROBS, ADVANTAGES, MASK, settings("token"))
    loss.backward()
    # dL/dlogp = −A·ρ / 4 where the unclipped term is active, 0 where the clipped one is
    expected = [[0.0, -1.0 * 0.5 / 4, 0.0], [1.0 * 1.5 / 4, 0.0, 0.0], [0.0, 0.0, 0.0]]
    torch.testing.assert_close(logprobs.grad, torch.tensor(expected))


def test_policy_loss_inside_the_clip_range_is_the_plain_surrogate() -> None:
    ratios = torch.tensor([[1.1, 0.9, 1.0]])
    advantages = torch.tensor([[2.0, -3.0, 0.6]])
    old = torch.zeros(1, 3)
    loss, stats = policy_loss(ratios.log(), old, advantages, torch.ones(1, 3), settings())
    assert loss.item() == pytest.approx((-2.0 * 1.1 + 3.0 * 0.9 - 0.6) / 3, rel=1e-5)  # −0.1 / 3
    assert stats["clip_frac"].item() == 0.0


def test_policy_loss_padding_never_leaks_into_loss_or_gradient() -> None:
    clean = logprobs_for(RATIOS)
    clean_loss, clean_stats = policy_loss(clean, OLD_LOGPROBS, ADVANTAGES, MASK, settings())
    clean_loss.backward()
    pad = ~MASK.bool()
    dirty = torch.where(pad, math.nan, OLD_LOGPROBS + RATIOS.log()).requires_grad_()
    dirty_old = torch.where(pad, -math.inf, OLD_LOGPROBS)
    dirty_advantages = torch.where(pad, 1e6, ADVANTAGES)
    for agg in ("token", "sequence"):
        dirty.grad = None
        loss, stats = policy_loss(dirty, dirty_old, dirty_advantages, MASK, settings(agg))
        loss.backward()
        assert torch.isfinite(dirty.grad).all()
        assert torch.all(dirty.grad[pad] == 0)
    loss, stats = policy_loss(dirty, dirty_old, dirty_advantages, MASK, settings("token"))
    assert loss.item() == clean_loss.item()
    assert {k: v.item() for k, v in stats.items()} == {k: v.item() for k, v in clean_stats.items()}


def test_unknown_aggregation_is_rejected() -> None:
    with pytest.raises(ValueError, match="unknown loss aggregation 'mean'"):
        policy_loss(OLD_LOGPROBS, OLD_LOGPROBS, ADVANTAGES, MASK, settings("mean"))


def test_value_loss_hand_values() -> None:
    values = torch.tensor([[1.0, 1.0, 0.55, 99.0]], requires_grad=True)
    old_values = torch.tensor([[0.5, 0.5, 0.5, -99.0]])
    returns = torch.tensor([[0.6, 1.5, 0.0, math.nan]])
    mask = torch.tensor([[1, 1, 1, 0]])
    # clip 0.2: V_clip = 0.5 + clip(0.5, ±0.2) = 0.7 for the first two, 0.55 (inside) for the third
    #   (1 − 0.6)² = 0.16    vs (0.7 − 0.6)² = 0.01  -> 0.16   unclipped
    #   (1 − 1.5)² = 0.25    vs (0.7 − 1.5)² = 0.64  -> 0.64   clipped active
    #   (0.55 − 0)² = 0.3025 vs the same            -> 0.3025 neither
    loss, stats = value_loss(values, old_values, returns, mask, clip=0.2)
    assert loss.item() == pytest.approx(0.5 * (0.16 + 0.64 + 0.3025) / 3)
    assert stats["value_clip_frac"].item() == pytest.approx(1 / 3)
    loss.backward()
    # d/dV of ½·mean: (V − R)/3 where unclipped is active; 0 where the clipped value is
    torch.testing.assert_close(values.grad, torch.tensor([[0.4 / 3, 0.0, 0.55 / 3, 0.0]]))


@pytest.mark.parametrize("agg", ["token", "sequence"])
def test_shares_with_a_global_denominator_add_up_to_the_whole_loss(agg) -> None:
    gen = torch.Generator().manual_seed(4)
    logprobs = torch.randn(6, 5, generator=gen) * 0.1 - 1
    old, adv = logprobs + torch.randn(6, 5, generator=gen) * 0.2, torch.randn(6, 5, generator=gen)
    mask = torch.arange(5) < torch.tensor([[5], [3], [0], [1], [4], [2]])
    whole, _ = policy_loss(logprobs, old, adv, mask, settings(agg))
    count = float(mask.sum()) if agg == "token" else float(mask.any(-1).sum())
    parts = [policy_loss(logprobs[i], old[i], adv[i], mask[i], settings(agg), count)[0] for i in ([0, 1], [2, 3, 4, 5])]
    torch.testing.assert_close(sum(parts), whole)
    values, returns = torch.randn(6, 5, generator=gen), torch.randn(6, 5, generator=gen)
    whole_v, _ = value_loss(values, values * 0.9, returns, mask, 0.2)
    n = float(mask.sum())
    parts_v = [value_loss(values[i], values[i] * 0.9, returns[i], mask[i], 0.2, n)[0] for i in ([0, 1, 2], [3, 4, 5])]
    torch.testing.assert_close(sum(parts_v), whole_v)


def test_dual_clip_bounds_a_negative_advantages_loss_and_leaves_the_rest_alone() -> None:
    ratios = torch.tensor([[0.5, 1.1, 5.0, 9.0]])
    advantages = torch.tensor([[-1.0, -1.0, -1.0, 2.0]])
    mask = torch.ones(1, 4)
    old = torch.zeros(1, 4)
    plain, plain_stats = policy_loss(ratios.log(), old, advantages, mask, settings(policy_loss="ppo_clip"))
    dual, dual_stats = policy_loss(
        ratios.log(), old, advantages, mask, settings(policy_loss="dual_clip", dual_clip_c=3.0)
    )
    # per token, ppo_clip: max(-A·ρ, -A·clip(ρ)) = [0.8, 1.1, 5.0, -2.4]; dual_clip caps A<0 at -c·A = 3.
    assert plain.item() == pytest.approx((0.8 + 1.1 + 5.0 - 2.4) / 4)
    assert dual.item() == pytest.approx((0.8 + 1.1 + 3.0 - 2.4) / 4)
    assert plain_stats["clip_frac"].item() == pytest.approx(2 / 4)  # 0.5 and 9.0 clipped
    assert dual_stats["clip_frac"].item() == pytest.approx(3 / 4)  # and 5.0 held at the bound
    ratios.requires_grad_(True)
    loss, _ = policy_loss(ratios.log(), old, advantages, mask, settings(policy_loss="dual_clip"))
    loss.backward()
    assert ratios.grad[0, 2].item() == 0.0  # held at the bound: no gradient pushes the ratio further
    assert ratios.grad[0, 1].item() == pytest.approx(0.25)  # -A/4 inside the clip range


def test_an_unknown_policy_loss_is_refused_naming_the_registered_ones() -> None:
    with pytest.raises(
        ConfigError, match="learner.policy_loss: unknown policy loss 'ppo2'; known: ppo_clip, dual_clip"
    ):
        policy_loss(OLD_LOGPROBS, OLD_LOGPROBS, ADVANTAGES, MASK, settings(policy_loss="ppo2"))


def test_the_config_names_are_checked_against_the_registries_at_start_up() -> None:
    from contracts.config.learner import KLConfig
    from learner.advantages import KL_ESTIMATORS
    from learner.estimators import ESTIMATORS, check_learner_names
    from learner.losses import LOSS_AGGREGATIONS, POLICY_LOSSES

    assert ESTIMATORS.names() == ("gae", "grpo", "rloo", "reinforce_pp")
    assert POLICY_LOSSES.names() == ("ppo_clip", "dual_clip")
    assert LOSS_AGGREGATIONS.names() == (
        "token_mean",
        "seq_mean_token_sum",
        "seq_mean_token_mean",
        "seq_mean_token_sum_norm",
    )
    assert KL_ESTIMATORS.names() == ("k1", "k3")
    check_learner_names(LearnerConfig(estimator="grpo", policy_loss="dual_clip"), n_samples=2)
    with pytest.raises(ConfigError, match="learner.estimator: unknown advantage estimator 'gea'; known: gae, grpo"):
        check_learner_names(LearnerConfig(estimator="gea"), n_samples=2)
    with pytest.raises(ConfigError, match="learner.policy_loss: unknown policy loss"):
        check_learner_names(LearnerConfig(policy_loss="ppo3"), n_samples=2)
    with pytest.raises(
        ConfigError, match="learner.loss_agg_mode: unknown loss aggregation 'seq_mean'; known: token_mean"
    ):
        check_learner_names(LearnerConfig(loss_agg_mode="seq_mean"), n_samples=2)
    with pytest.raises(ConfigError, match="learner.kl.estimator: unknown KL estimator 'k2'; known: k1, k3"):
        check_learner_names(LearnerConfig(kl=KLConfig(estimator="k2")), n_samples=2)
    with pytest.raises(ConfigError, match="needs rollout.n_samples >= 2"):
        check_learner_names(LearnerConfig(estimator="rloo"), n_samples=1)


@pytest.mark.parametrize(
    "mode, expected",
    [
        # Per token L (see RATIOS): row 0 = [-1.2, -0.5, 0.8], row 1 = [1.5], row 2 empty.
        ("token_mean", (-1.2 - 0.5 + 0.8 + 1.5) / 4),  # Σ L / 4 tokens = 0.15
        ("seq_mean_token_sum", ((-1.2 - 0.5 + 0.8) + 1.5) / 2),  # (−0.9 + 1.5) / 2 sequences = 0.3
        ("seq_mean_token_mean", ((-1.2 - 0.5 + 0.8) / 3 + 1.5) / 2),  # (−0.3 + 1.5) / 2 = 0.6
        ("seq_mean_token_sum_norm", ((-1.2 - 0.5 + 0.8) / 4 + 1.5 / 4) / 2),  # C = 4: 0.075
    ],
)
def test_each_loss_aggregation_mode_against_hand_values(mode, expected) -> None:
    loss, _ = policy_loss(logprobs_for(RATIOS), OLD_LOGPROBS, ADVANTAGES, MASK, settings(mode, loss_agg_norm_tokens=4))
    assert loss.item() == pytest.approx(expected)


@pytest.mark.parametrize(
    "mode, count",
    [("token_mean", 4), ("seq_mean_token_sum", 2), ("seq_mean_token_mean", 2), ("seq_mean_token_sum_norm", 2)],
)
def test_each_loss_aggregation_carries_its_denominator_and_a_given_one_replaces_its_own(mode, count) -> None:
    from learner.losses import loss_denominator

    lengths = MASK.sum(-1)  # valid tokens per row: 3, 1, 0
    assert int(loss_denominator(mode, lengths)) == int(loss_denominator(mode, lengths.numpy())) == count
    own, _ = policy_loss(logprobs_for(RATIOS), OLD_LOGPROBS, ADVANTAGES, MASK, settings(mode, loss_agg_norm_tokens=4))
    halved, _ = policy_loss(
        logprobs_for(RATIOS), OLD_LOGPROBS, ADVANTAGES, MASK, settings(mode, loss_agg_norm_tokens=4), 2 * count
    )
    assert halved.item() == pytest.approx(own.item() / 2)


def test_clip_higher_raises_only_the_upper_bound_and_counts_each_side() -> None:
    ratios = torch.tensor([[1.25, 1.5, 0.7, 1.0]])
    advantages = torch.tensor([[1.0, 1.0, -1.0, 1.0]])
    mask, old = torch.ones(1, 4), torch.zeros(1, 4)
    # symmetric ε = 0.2: L = [max(−1.25, −1.2), max(−1.5, −1.2), max(0.7, 0.8), −1] = [−1.2, −1.2, 0.8, −1]
    symmetric, s_stats = policy_loss(ratios.log(), old, advantages, mask, settings())
    # ε_high = 0.28: the upper bound is 1.28, so 1.25 is no longer clipped: [−1.25, −1.28, 0.8, −1]
    higher, h_stats = policy_loss(ratios.log(), old, advantages, mask, settings(clip_eps_high=0.28))
    assert symmetric.item() == pytest.approx((-1.2 - 1.2 + 0.8 - 1.0) / 4)
    assert higher.item() == pytest.approx((-1.25 - 1.28 + 0.8 - 1.0) / 4)
    assert (s_stats["clip_frac_high"].item(), s_stats["clip_frac_low"].item()) == (pytest.approx(2 / 4), 0.25)
    assert (h_stats["clip_frac_high"].item(), h_stats["clip_frac_low"].item()) == (pytest.approx(1 / 4), 0.25)
    assert h_stats["clip_frac"].item() == pytest.approx(2 / 4)
