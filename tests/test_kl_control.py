"""Fixed and adaptive KL coefficient controllers."""

from __future__ import annotations

import math

import pytest

from learner.kl_control import AdaptiveKLController, FixedKLController, make_kl_controller


def adaptive() -> AdaptiveKLController:
    return AdaptiveKLController(init_coef=0.1, target=6.0, horizon=10_000)


@pytest.mark.parametrize(
    "current_kl, expected",
    [
        (12.0, 0.1 * (1 + 0.2 * 1000 / 10_000)),  # 12/6 − 1 = 1, clipped to +0.2 -> 0.102
        (6.6, 0.1 * (1 + 0.1 * 1000 / 10_000)),  # 6.6/6 − 1 = 0.1, inside the clip -> 0.101
        (6.0, 0.1),  # on target: no change
        (5.4, 0.1 * (1 - 0.1 * 1000 / 10_000)),  # −0.1 -> 0.099
        (0.0, 0.1 * (1 - 0.2 * 1000 / 10_000)),  # −1 clipped to −0.2 -> 0.098
    ],
)
def test_adaptive_update_hand_values(current_kl: float, expected: float) -> None:
    controller = adaptive()
    controller.update(current_kl, n_samples=1000)
    assert controller.coef == pytest.approx(expected)


def test_adaptive_moves_up_above_target_and_down_below() -> None:
    controller = adaptive()
    for _ in range(20):
        before = controller.coef
        controller.update(9.0, n_samples=512)
        assert controller.coef > before
    for _ in range(20):
        before = controller.coef
        controller.update(2.0, n_samples=512)
        assert controller.coef < before


def test_fixed_never_moves() -> None:
    controller = FixedKLController(0.05)
    controller.update(100.0, n_samples=10_000)
    controller.update(0.0, n_samples=10_000)
    assert controller.coef == 0.05


def test_state_dict_round_trip_resumes_the_same_trajectory() -> None:
    original = adaptive()
    for kl in (9.0, 7.0, 1.0):
        original.update(kl, n_samples=256)
    resumed = adaptive()
    resumed.load_state_dict(original.state_dict())
    assert resumed.coef == original.coef != 0.1
    original.update(8.0, n_samples=256)
    resumed.update(8.0, n_samples=256)
    assert resumed.coef == original.coef

    fixed = FixedKLController(0.3)
    restored = FixedKLController(0.0)
    restored.load_state_dict(fixed.state_dict())
    assert restored.coef == 0.3


def test_factory_picks_the_controller_from_the_target() -> None:
    fixed = make_kl_controller(0.2, None, horizon=10_000)
    assert isinstance(fixed, FixedKLController) and fixed.coef == 0.2
    tracking = make_kl_controller(0.2, 6.0, horizon=5_000)
    assert isinstance(tracking, AdaptiveKLController)
    assert (tracking.coef, tracking.target, tracking.horizon) == (0.2, 6.0, 5_000)


@pytest.mark.parametrize("args", [(0.0, 6.0, 10_000), (0.1, 0.0, 10_000), (0.1, 6.0, 0), (-0.1, 6.0, 10_000)])
def test_adaptive_rejects_bad_settings(args: tuple[float, float, float]) -> None:
    with pytest.raises(ValueError):
        AdaptiveKLController(*args)


def test_fixed_rejects_negative_coef() -> None:
    with pytest.raises(ValueError):
        FixedKLController(-1.0)


def test_adaptive_rejects_non_finite_kl_and_a_batch_larger_than_the_horizon_allows() -> None:
    controller = adaptive()
    with pytest.raises(ValueError, match="non-finite"):
        controller.update(math.nan, n_samples=10)
    # e = −0.2 with n = 5·H would make the factor 1 − 0.2·5 = 0
    with pytest.raises(ValueError, match="horizon"):
        controller.update(0.0, n_samples=50_000)
    assert controller.coef == 0.1
