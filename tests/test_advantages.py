"""Masked statistics, KL penalties, token rewards and GAE against hand-worked values and a loop."""

from __future__ import annotations

import math

import pytest
import torch

from contracts.config import ConfigError
from learner.advantages import (
    discounted_reverse_cumsum,
    gae,
    gae_reference,
    kl_penalty,
    last_token_mask,
    masked_mean,
    masked_var,
    masked_whiten,
    token_rewards,
)


def padded_batch(
    batch: int, steps: int, seed: int, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random rewards and values with right-padded random lengths (some empty, some full)."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, steps + 1, (batch,), generator=gen)
    lengths[0], lengths[-1] = 0, steps
    mask = torch.arange(steps) < lengths.unsqueeze(1)
    rewards = 0.05 * torch.randn(batch, steps, generator=gen, dtype=dtype)
    rewards = rewards + torch.where(last_token_mask(mask), torch.randn(batch, 1, generator=gen), 0)
    values = torch.randn(batch, steps, generator=gen, dtype=dtype)
    return rewards, values, mask


def assert_values(actual: torch.Tensor, expected: list, atol: float = 1e-6) -> None:
    """Compare a tensor with hand-worked numbers."""
    want = torch.tensor(expected, dtype=actual.dtype)
    torch.testing.assert_close(actual, want, atol=atol, rtol=0)


MASK_2X3 = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])


def test_masked_mean_ignores_padding_even_if_it_is_inf() -> None:
    x = torch.tensor([[1.0, 2.0, math.inf], [3.0, math.nan, -50.0]])
    assert masked_mean(x, MASK_2X3).item() == pytest.approx(2.0)  # (1 + 2 + 3) / 3
    assert masked_mean(x, MASK_2X3, dim=-1).tolist() == pytest.approx([1.5, 3.0])


def test_masked_mean_of_nothing_is_zero() -> None:
    assert masked_mean(torch.ones(2, 3), torch.zeros(2, 3)).item() == 0.0


def test_masked_var_biased_and_unbiased() -> None:
    x = torch.tensor([[1.0, 2.0, 100.0], [3.0, -7.0, 8.0]])
    # valid 1, 2, 3: mean 2, squared deviations 1 + 0 + 1 = 2
    assert masked_var(x, MASK_2X3).item() == pytest.approx(2.0 / 2)
    assert masked_var(x, MASK_2X3, unbiased=False).item() == pytest.approx(2.0 / 3)


def test_masked_whiten_standardises_valid_tokens_and_zeroes_padding() -> None:
    x = torch.tensor([[1.0, 2.0, 100.0], [3.0, -7.0, 8.0]])
    out = masked_whiten(x, MASK_2X3)
    # (x − 2) / √(2/3)
    scale = math.sqrt(2.0 / 3.0)
    assert_values(out, [[-1 / scale, 0.0, 0.0], [1 / scale, 0.0, 0.0]], atol=1e-5)
    kept = masked_whiten(x, MASK_2X3, shift_mean=False)
    assert masked_mean(kept, MASK_2X3).item() == pytest.approx(2.0)
    assert kept[0, 2].item() == 0.0


def test_kl_penalty_hand_values() -> None:
    logprobs = torch.tensor([[-1.0, -2.0]])
    ref = torch.tensor([[-1.5, -1.0]])
    assert_values(kl_penalty(logprobs, ref, "k1"), [[0.5, -1.0]])
    # k3 with r = exp(ref − logp): r = e^−0.5 gives (e^−0.5 − 1) + 0.5; r = e^1 gives (e − 1) − 1
    expected = [[math.exp(-0.5) - 1 + 0.5, math.e - 1 - 1]]
    assert_values(kl_penalty(logprobs, ref, "k3"), expected)


def test_kl_estimators_zero_when_equal_and_k3_never_negative() -> None:
    gen = torch.Generator().manual_seed(0)
    logprobs = -torch.rand(64, 32, generator=gen) * 5
    ref = -torch.rand(64, 32, generator=gen) * 5
    assert torch.all(kl_penalty(logprobs, ref, "k3") >= 0)
    assert torch.any(kl_penalty(logprobs, ref, "k1") < 0)  # k1 is only non-negative on average
    for estimator in ("k1", "k3"):
        assert torch.all(kl_penalty(logprobs, logprobs, estimator) == 0)


def test_kl_estimators_are_unbiased_for_the_true_kl() -> None:
    # p = softmax(a), ref = softmax(b) over 4 tokens; sample from p and average the estimators
    gen = torch.Generator().manual_seed(1)
    log_p = torch.log_softmax(torch.tensor([1.0, 0.2, -0.5, 0.0]), -1)
    log_ref = torch.log_softmax(torch.tensor([0.3, 0.5, 0.1, -1.0]), -1)
    true_kl = (log_p.exp() * (log_p - log_ref)).sum().item()
    tokens = torch.multinomial(log_p.exp(), 200_000, replacement=True, generator=gen)
    for estimator in ("k1", "k3"):
        estimate = kl_penalty(log_p[tokens], log_ref[tokens], estimator).mean().item()
        assert estimate == pytest.approx(true_kl, abs=5e-3)


def test_unknown_kl_estimator_is_rejected() -> None:
    with pytest.raises(ConfigError, match="learner.kl.estimator: unknown KL estimator 'k2'; known: k1, k3"):
        kl_penalty(torch.zeros(1, 1), torch.zeros(1, 1), "k2")  # type: ignore[arg-type]


def test_last_token_mask() -> None:
    mask = torch.tensor([[1, 1, 1], [1, 1, 0], [0, 0, 0]])
    assert last_token_mask(mask).tolist() == [
        [False, False, True],
        [False, True, False],
        [False, False, False],
    ]


def test_token_rewards_hand_values() -> None:
    scores = torch.tensor([1.0, -0.5, 3.0])
    logprobs = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -1.2, 7.0], [-1.0, -1.0, -1.0]])
    ref = torch.tensor([[-1.5, -2.0, -0.4], [-0.1, -1.0, math.inf], [-2.0, -2.0, -2.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0], [0, 0, 0]])
    rewards, kl = token_rewards(scores, logprobs, ref, mask, kl_coef=0.1, estimator="k1")
    # k1 = logp − ref: row 0 [0.5, 0, −0.1], row 1 [−0.2, −0.2, pad]; row 2 is empty
    assert_values(kl, [[0.5, 0.0, -0.1], [-0.2, -0.2, 0.0], [0.0, 0.0, 0.0]])
    # r = −0.1·kl, plus the score on the last valid token; the empty row's score goes nowhere
    assert_values(rewards, [[-0.05, 0.0, 0.01 + 1.0], [0.02, 0.02 - 0.5, 0.0], [0.0, 0.0, 0.0]])


def test_token_rewards_k3_is_non_negative_penalty() -> None:
    logprobs = torch.tensor([[-1.0, -3.0]])
    ref = torch.tensor([[-2.0, -1.0]])
    rewards, kl = token_rewards(torch.zeros(1), logprobs, ref, torch.ones(1, 2), 0.5, "k3")
    assert torch.all(kl > 0)
    assert torch.equal(rewards, -0.5 * kl)


def test_gae_hand_worked_2x3() -> None:
    gamma, lam = 0.9, 0.8  # γλ = 0.72
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.1, 2.0, 5.0]])
    values = torch.tensor([[0.5, 0.4, 0.2], [1.0, 0.5, 9.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    # Row 0:  δ2 = 1 − 0.2 = 0.8 (nothing after the last token)
    #         δ1 = 0 + 0.9·0.2 − 0.4 = −0.22;  δ0 = 0 + 0.9·0.4 − 0.5 = −0.14
    #         A2 = 0.8;  A1 = −0.22 + 0.72·0.8 = 0.356;  A0 = −0.14 + 0.72·0.356 = 0.11632
    # Row 1 (the 5.0 and 9.0 are padding): δ1 = 2 − 0.5 = 1.5;  δ0 = 0.1 + 0.9·0.5 − 1 = −0.45
    #         A1 = 1.5;  A0 = −0.45 + 0.72·1.5 = 0.63
    expected_advantages = [[0.11632, 0.356, 0.8], [0.63, 1.5, 0.0]]
    expected_returns = [[0.11632 + 0.5, 0.356 + 0.4, 0.8 + 0.2], [0.63 + 1.0, 1.5 + 0.5, 0.0]]
    for fn in (gae, gae_reference):
        advantages, returns = fn(rewards, values, mask, gamma, lam)
        assert_values(advantages, expected_advantages)
        assert_values(returns, expected_returns)


def test_gae_with_lam_zero_is_one_step_td() -> None:
    rewards, values, mask = padded_batch(8, 10, seed=3)
    advantages, _ = gae(rewards, values, mask, gamma=0.9, lam=0.0)
    next_values = torch.cat([values[:, 1:] * mask[:, 1:], torch.zeros(8, 1)], dim=1)
    td = torch.where(mask, rewards + 0.9 * next_values - values, 0)
    torch.testing.assert_close(advantages, td)


@pytest.mark.parametrize("gamma, lam", [(1.0, 1.0), (1.0, 0.95), (0.99, 0.95), (0.9, 0.8)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gae_matches_reference_loop_at_t512(gamma: float, lam: float, dtype: torch.dtype) -> None:
    rewards, values, mask = padded_batch(48, 512, seed=7, dtype=dtype)
    advantages, returns = gae(rewards, values, mask, gamma, lam)
    ref_advantages, ref_returns = gae_reference(rewards, values, mask, gamma, lam)
    assert advantages.dtype == dtype
    torch.testing.assert_close(advantages, ref_advantages, atol=1e-5, rtol=0)
    torch.testing.assert_close(returns, ref_returns, atol=1e-5, rtol=0)


@pytest.mark.parametrize("block", [1, 3, 64, 100, 1000])
def test_gae_block_size_does_not_change_the_result(block: int) -> None:
    rewards, values, mask = padded_batch(16, 100, seed=11, dtype=torch.float64)
    advantages, returns = gae(rewards, values, mask, 0.97, 0.9, block=block)
    ref_advantages, ref_returns = gae_reference(rewards, values, mask, 0.97, 0.9)
    torch.testing.assert_close(advantages, ref_advantages, atol=1e-10, rtol=0)
    torch.testing.assert_close(returns, ref_returns, atol=1e-10, rtol=0)


def test_gae_padding_never_leaks() -> None:
    rewards, values, mask = padded_batch(32, 40, seed=5)
    advantages, returns = gae(rewards, values, mask, 0.99, 0.95)
    noise = torch.randn(32, 40) * 1e3
    dirty_rewards = torch.where(mask, rewards, noise)
    dirty_values = torch.where(mask, values, torch.full_like(values, math.inf))
    dirty_advantages, dirty_returns = gae(dirty_rewards, dirty_values, mask, 0.99, 0.95)
    assert torch.equal(advantages, dirty_advantages)
    assert torch.equal(returns, dirty_returns)
    assert torch.all(advantages[~mask] == 0) and torch.all(returns[~mask] == 0)
    assert torch.all(advantages[0] == 0)  # the empty row


def test_gae_bf16_inputs_are_computed_in_float32() -> None:
    rewards, values, mask = padded_batch(8, 200, seed=2)
    advantages, _ = gae(rewards.bfloat16(), values.bfloat16(), mask, 1.0, 0.95)
    ref_advantages, _ = gae_reference(rewards.bfloat16(), values.bfloat16(), mask, 1.0, 0.95)
    assert advantages.dtype == torch.float32
    torch.testing.assert_close(advantages, ref_advantages, atol=1e-5, rtol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gae_on_cuda_matches_cpu() -> None:
    rewards, values, mask = padded_batch(64, 300, seed=9)
    cpu = gae(rewards, values, mask, 0.99, 0.95)
    cuda = gae(rewards.cuda(), values.cuda(), mask.cuda(), 0.99, 0.95)
    for on_cpu, on_cuda in zip(cpu, cuda):
        assert on_cuda.device.type == "cuda"
        torch.testing.assert_close(on_cuda.cpu(), on_cpu, atol=1e-5, rtol=0)


def test_gae_rejects_a_mask_with_holes_and_bad_discounts() -> None:
    rewards = values = torch.zeros(1, 4)
    with pytest.raises(ValueError, match="prefix"):
        gae(rewards, values, torch.tensor([[1, 0, 1, 0]]), 0.9, 0.9)
    with pytest.raises(ValueError, match="gamma"):
        gae(rewards, values, torch.ones(1, 4), 1.1, 0.9)


def test_discounted_reverse_cumsum_hand_values() -> None:
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0]])
    # y4 = 5; y3 = 4 + 0.5·5 = 6.5; y2 = 3 + 0.5·6.5 = 6.25; y1 = 2 + 3.125 = 5.125; y0 = 1 + 2.5625
    expected = [[3.5625, 5.125, 6.25, 6.5, 5.0]]
    for block in (1, 2, 5, 64):
        assert_values(discounted_reverse_cumsum(x, 0.5, block), expected)
    assert discounted_reverse_cumsum(x, 0.0).tolist() == x.tolist()
    assert discounted_reverse_cumsum(x, 1.0).tolist() == [[15.0, 14.0, 12.0, 9.0, 5.0]]
