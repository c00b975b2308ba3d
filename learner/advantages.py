"""Per-token rewards and advantages for PPO, as pure functions on (batch, time) response tensors.

Conventions for every function here: `mask` is (B, T), bool or float, true on the valid response
tokens of a row. Responses are right-padded, so the valid tokens are a contiguous prefix of each row
(a row may be empty). Padded positions may hold anything, inf and nan included: they never reach a
valid output, and every (B, T) output is zero there. Results stay on the inputs' device; advantage
math runs in at least float32 because bf16 cannot hold a discounted sum over hundreds of tokens.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from contracts.registry import Registry

KLEstimator = str  # a name in KL_ESTIMATORS
# Each entry: the per-token KL estimate from the log-ratio log p − log p_ref, (B, T) -> (B, T).
KL_ESTIMATORS: Registry[Callable[[torch.Tensor], torch.Tensor]] = Registry("KL estimator", "learner.kl.estimator")


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of `x` over the positions where `mask` is true.

    x, mask: the same shape. dim=None reduces everything to a 0-dim tensor; otherwise `dim` is
    reduced. A selection with no valid position gives 0 rather than nan, so a batch of empty
    responses contributes no gradient instead of poisoning the update.
    """
    keep = mask.bool()
    total = torch.where(keep, x, 0).sum(dim)
    count = keep.sum(dim)
    return total / count.clamp(min=1)  # Σ m·x / max(Σ m, 1)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of `x` over the positions where `mask` is true, as a 0-dim tensor.

    x, mask: the same shape. `unbiased` applies Bessel's correction n / (n - 1), which is nan for a
    single valid position, as `torch.var` is.
    """
    centred = x - masked_mean(x, mask)
    variance = masked_mean(centred.square(), mask)  # Σ m·(x − μ)² / Σ m
    if unbiased:
        count = mask.bool().sum()
        variance = variance * count / (count - 1)
    return variance


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """Scale `x` to unit variance over the valid positions, and to zero mean when `shift_mean`.

    x, mask: (B, T) -> (B, T), zero on padding. Uses the biased variance so that a batch with one
    valid token whitens to 0 instead of nan.
    """
    mean = masked_mean(x, mask)
    variance = masked_var(x, mask, unbiased=False)
    whitened = (x - mean) * torch.rsqrt(variance + 1e-8)  # (x − μ) / √(σ² + ε)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(mask.bool(), whitened, 0)


@KL_ESTIMATORS.register("k1")
def k1(log_ratio: torch.Tensor) -> torch.Tensor:
    """The plain log-ratio: unbiased, signed per token."""
    return log_ratio  # k1 = log p − log p_ref


@KL_ESTIMATORS.register("k3")
def k3(log_ratio: torch.Tensor) -> torch.Tensor:
    """Non-negative per token, and also unbiased."""
    log_r = -log_ratio  # log r, with r = p_ref / p
    return torch.expm1(log_r) - log_r  # k3 = (r − 1) − log r; expm1 keeps precision near r = 1


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: KLEstimator = "k1") -> torch.Tensor:
    """Per-token estimate of KL(policy || reference) from the sampled tokens' log-probabilities, by the
    estimator of `KL_ESTIMATORS` named `estimator` (`learner.kl.estimator`).

    logprobs, ref_logprobs: (B, T) -> (B, T). Elementwise and unmasked: the caller zeroes padding
    (`token_rewards` does), which keeps this usable on any shape.
    """
    return KL_ESTIMATORS.lookup(estimator)(logprobs - ref_logprobs)


def last_token_mask(mask: torch.Tensor) -> torch.Tensor:
    """True at the last valid token of each row, false elsewhere and on empty rows.

    mask: (B, T) -> bool (B, T).
    """
    keep = mask.bool()
    remaining = keep.flip(-1).cumsum(-1).flip(-1)  # valid tokens from t to the end of the row
    return keep & (remaining == 1)


def token_rewards(
    scores: torch.Tensor,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float,
    estimator: KLEstimator = "k1",
    turn_rewards: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The reward GAE sees: a KL penalty on every valid token, the sequence score on the last one, and
    an episode's per-turn rewards (`turn_rewards`, (B, T), nonzero on each rewarded turn's last token).

    scores: (B,); logprobs, ref_logprobs, mask: (B, T) -> (rewards (B, T), kl (B, T)), both zero on
    padding and at an episode's environment tokens (holes in `mask`). A row with an empty response has
    no token to carry its score, so it gets no reward.
    """
    keep = mask.bool()
    kl = torch.where(keep, kl_penalty(logprobs, ref_logprobs, estimator), 0)
    final_score = torch.where(last_token_mask(keep), scores.unsqueeze(-1), 0)
    rewards = -kl_coef * kl + final_score  # r_t = −β·kl_t + [t is last]·score
    if turn_rewards is not None:
        rewards = rewards + torch.where(keep, turn_rewards, 0)  # + the turn's reward on its last token
    return rewards, kl


def model_tokens_first(mask: torch.Tensor) -> torch.Tensor:
    """The order that puts each row's valid positions first, keeping their order: an episode's model tokens
    packed together, the environment's tokens between them (holes in `mask`) moved out of the way.

    mask: (B, T) -> (B, T) int64 indices for `gather` (`compact`) and `scatter` (`expand`)."""
    keep = mask.bool()
    return torch.argsort((~keep).to(torch.int8), dim=-1, stable=True)  # valid (0) before the rest (1), stable


def compact(x: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """x (B, T) with each row's valid positions moved to its front, in order (`model_tokens_first`)."""
    return x.gather(-1, order)


def expand(x: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """The inverse of `compact`: x (B, T) back to its positions; what `compact` moved out is zero."""
    return torch.zeros_like(x).scatter(-1, order, x)


def has_holes(mask: torch.Tensor) -> bool:
    """Whether some row's valid positions are not a prefix (an episode: the environment's turns are holes)."""
    keep = mask.bool()
    return bool(torch.any(keep[:, 1:] > keep[:, :-1]))


def discounted_reverse_cumsum(x: torch.Tensor, discount: float, block: int = 64) -> torch.Tensor:
    """y_t = Σ_{k ≥ t} discount^(k − t) · x_k along the last dimension, exactly and without a loop
    over time steps.

    x: (B, T) -> (B, T); 0 <= discount <= 1. Time is cut into blocks: inside a block the sum is one
    matmul with the upper-triangular matrix Γ[t, k] = discount^(k − t), and each block then takes
    the carry from the first entry of the block after it, one short loop over T / block blocks.
    Every power is at most 1, so nothing overflows (scaling by discount^−t and a cumsum would).
    """
    batch, steps = x.shape
    block = max(1, min(block, steps))
    n_blocks = -(-steps // block)
    overhang = n_blocks * block - steps
    blocks = torch.nn.functional.pad(x, (0, overhang)) if overhang else x
    blocks = blocks.reshape(batch, n_blocks, block)
    lag = torch.arange(block, device=x.device)
    lag = lag.unsqueeze(0) - lag.unsqueeze(1)  # lag[t, k] = k − t
    gamma_matrix = torch.where(lag >= 0, discount ** lag.clamp(min=0).to(x.dtype), 0)
    y = blocks @ gamma_matrix.T  # y_t = Σ_{k in block, k ≥ t} Γ[t, k] x_k
    # discount^(block − i) carries the next block's first entry back to position i of this block.
    carry = discount ** torch.arange(block, 0, -1, device=x.device, dtype=x.dtype)
    for b in range(n_blocks - 2, -1, -1):
        y[:, b] += carry * y[:, b + 1, :1]
    return y.view(batch, n_blocks * block)[:, :steps]


def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    gamma: float,
    lam: float,
    block: int = 64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016), vectorised over batch and time.

    rewards, values, mask: (B, T) -> (advantages (B, T), returns (B, T)), zero on padding.
    The episode ends after the last valid token, whose successor value is 0. The recursion
    A_t = δ_t + γλ·m_{t+1}·A_{t+1} unrolls to A_t = Σ_{k ≥ t} (γλ)^(k − t) δ_k because δ is zero
    after the last valid token of a prefix mask; that sum is what is computed. Raises ValueError
    if a mask row is not a prefix, as a hole would let advantage flow across it.
    """
    if not (0.0 <= gamma <= 1.0 and 0.0 <= lam <= 1.0):
        raise ValueError(f"gamma and lam must lie in [0, 1], got gamma={gamma}, lam={lam}")
    keep = mask.bool()
    _check_prefix(keep)
    dtype = torch.promote_types(torch.promote_types(rewards.dtype, values.dtype), torch.float32)
    # Zeroed padding makes the shifted values V_{t+1}·m_{t+1}: nothing follows the last token.
    values = torch.where(keep, values.to(dtype), 0)
    next_values = _shift_left(values)
    rewards = rewards.to(dtype)
    deltas = torch.where(keep, rewards + gamma * next_values - values, 0)  # δ_t = r_t + γV_{t+1} − V_t
    advantages = discounted_reverse_cumsum(deltas, gamma * lam, block)  # A_t = Σ (γλ)^(k−t) δ_k
    returns = advantages + values  # R_t = A_t + V_t, zero on padding as both terms are
    return advantages, returns


def gae_reference(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """GAE written as the textbook recursion, one sample and one time step at a time in Python.

    Same shapes and result as `gae`; the yardstick its tests and benchmark compare against. Works in
    Python floats (float64) and accepts any mask, holes included: it applies m_{t+1} literally.
    """
    dtype = torch.promote_types(torch.promote_types(rewards.dtype, values.dtype), torch.float32)
    all_advantages, all_returns = [], []
    for row_rewards, row_values, row_mask in zip(rewards.tolist(), values.tolist(), mask.bool().tolist()):
        steps = len(row_rewards)
        advantages, returns = [0.0] * steps, [0.0] * steps
        next_advantage, next_value, next_valid = 0.0, 0.0, False
        for t in reversed(range(steps)):
            if row_mask[t]:
                bootstrap = gamma * next_value if next_valid else 0.0
                delta = row_rewards[t] + bootstrap - row_values[t]
                future = gamma * lam * next_advantage if next_valid else 0.0
                next_advantage = delta + future
                advantages[t] = next_advantage
                returns[t] = next_advantage + row_values[t]
            next_value, next_valid = row_values[t], row_mask[t]
        all_advantages.append(advantages)
        all_returns.append(returns)
    return (
        torch.tensor(all_advantages, dtype=dtype, device=rewards.device).view(rewards.shape),
        torch.tensor(all_returns, dtype=dtype, device=rewards.device).view(rewards.shape),
    )


def _shift_left(x: torch.Tensor) -> torch.Tensor:
    """x_{t+1} along the last dimension, 0 after the end. (B, T) -> (B, T)."""
    return torch.nn.functional.pad(x[:, 1:], (0, 1))


def _check_prefix(keep: torch.Tensor) -> None:
    """Raise ValueError unless every row of the bool (B, T) mask is true on a prefix only."""
    if torch.any(keep[:, 1:] > keep[:, :-1]):  # a valid token right after a padded one
        raise ValueError("mask rows must be contiguous prefixes (right-padded responses)")
