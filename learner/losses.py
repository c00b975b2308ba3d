"""PPO objectives on (batch, time) response tensors: the policy losses (a registry, `POLICY_LOSSES`, keyed
by `learner.policy_loss`) and the clipped value loss.

Both reduce to a mean by default; given a `denominator` (the whole minibatch's count of valid
tokens, or of non-empty sequences, across micro-batches and ranks) they return this piece's share
of it, so the shares of every micro-batch on every rank add up to the minibatch's mean.

Masking follows `learner.advantages`: `mask` is (B, T), true on each row's valid response tokens.
Inputs are zeroed on padding before any arithmetic, so garbage there (inf, nan) reaches neither the
loss nor its gradient.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal, get_args

import torch

from contracts.config import PolicyLossName
from learner.advantages import masked_mean

Aggregation = Literal["token", "sequence"]


def ppo_clip(
    ratio: torch.Tensor, advantages: torch.Tensor, clip_eps: float, dual_clip_c: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate (Schulman et al. 2017), per token, to be minimised.

    ratio ρ = π / π_old, advantages: (B, T) -> (loss (B, T), (B, T) bool: the clipped term is the active one).
    """
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
    return torch.maximum(unclipped, clipped), clipped > unclipped  # L_t = max(−A·ρ, −A·clip(ρ, 1−ε, 1+ε))


def dual_clip(
    ratio: torch.Tensor, advantages: torch.Tensor, clip_eps: float, dual_clip_c: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dual-clip PPO (Ye et al. 2020): where A < 0, the clipped loss is bounded by −c·A, so a huge ratio
    (which the plain clip leaves unbounded for a negative advantage) adds at most c·|A|. Shapes as ppo_clip;
    a token held at the bound counts as clipped."""
    loss, clipped = ppo_clip(ratio, advantages, clip_eps, dual_clip_c)
    bound = -dual_clip_c * advantages
    held = (advantages < 0) & (loss > bound)
    return torch.where(held, bound, loss), clipped | held  # L_t = min(L_t, −c·A) where A < 0


PolicyLoss = Callable[[torch.Tensor, torch.Tensor, float, float], tuple[torch.Tensor, torch.Tensor]]
POLICY_LOSSES: dict[str, PolicyLoss] = {"ppo_clip": ppo_clip, "dual_clip": dual_clip}
if set(POLICY_LOSSES) != set(get_args(PolicyLossName)):
    raise ImportError(
        f"learner.losses {sorted(POLICY_LOSSES)} and contracts.config.PolicyLossName "
        f"{sorted(get_args(PolicyLossName))} disagree: add the name to both"
    )


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float,
    agg: Aggregation = "token",
    denominator: float | None = None,
    weights: torch.Tensor | None = None,
    kind: str = "ppo_clip",
    dual_clip_c: float = 3.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The policy loss `kind` (a POLICY_LOSSES name; PPO's clipped surrogate by default), to be minimised.

    `weights` (B, T), detached, scale each token's term: decoupled PPO (Hilton et al. 2022) passes
    the truncated importance weight min(π_old / π_behaviour, cap) of samples drawn by other weights.

    logprobs (current policy), old_logprobs (the policy that sampled), advantages, mask: (B, T) ->
    (0-dim loss, stats). `agg` "token" averages over all valid tokens, so long responses weigh more;
    "sequence" averages within each response first, then over responses with at least one token.
    stats (0-dim, detached): "clip_frac", the share of valid tokens where a clipped term is the
    active one, and "approx_kl", the k3 estimate of KL(old || current).
    """
    if kind not in POLICY_LOSSES:
        raise ValueError(f"unknown policy loss {kind!r}; expected one of {', '.join(POLICY_LOSSES)}")
    keep = mask.bool()
    log_ratio = torch.where(keep, logprobs - old_logprobs, 0)
    advantages = torch.where(keep, advantages, 0)
    ratio = torch.exp(log_ratio)  # ρ_t = π(a_t) / π_old(a_t)
    per_token, clipped = POLICY_LOSSES[kind](ratio, advantages, clip_eps, dual_clip_c)
    if weights is not None:
        per_token = torch.where(keep, weights, 0) * per_token  # w_t·L_t
    loss = _aggregate(per_token, keep, agg, denominator)
    with torch.no_grad():
        stats = {
            "clip_frac": masked_mean(clipped.to(per_token.dtype), keep),
            "approx_kl": masked_mean(torch.expm1(log_ratio) - log_ratio, keep),  # (ρ − 1) − log ρ
        }
    return loss, stats


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip: float,
    denominator: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped value loss: the critic may not move more than `clip` from the values it had at
    rollout time, except where that would lower the loss.

    values (current critic), old_values (rollout critic), returns, mask: (B, T) -> (0-dim loss,
    stats). Averaged over valid tokens. stats (0-dim, detached): "value_clip_frac", the share of
    valid tokens where the clipped error is the larger one.
    """
    keep = mask.bool()
    values = torch.where(keep, values, 0)
    old_values = torch.where(keep, old_values, 0)
    returns = torch.where(keep, returns, 0)
    values_clipped = old_values + torch.clamp(values - old_values, -clip, clip)  # V_o + clip(ΔV, ±c)
    unclipped = (values - returns).square()
    clipped = (values_clipped - returns).square()
    worst = torch.maximum(unclipped, clipped)
    if denominator is None:
        loss = 0.5 * masked_mean(worst, keep)  # ½ mean max((V−R)², (V_c−R)²)
    else:
        loss = 0.5 * torch.where(keep, worst, 0).sum() / denominator
    with torch.no_grad():
        stats = {"value_clip_frac": masked_mean((clipped > unclipped).to(unclipped.dtype), keep)}
    return loss, stats


def _aggregate(
    per_token: torch.Tensor, keep: torch.Tensor, agg: Aggregation, denominator: float | None
) -> torch.Tensor:
    """Reduce a (B, T) per-token loss to a 0-dim one, by token or by sequence (see policy_loss)."""
    if agg == "token":
        if denominator is not None:
            return torch.where(keep, per_token, 0).sum() / denominator  # Σ m·L / N_tokens
        return masked_mean(per_token, keep)  # Σ m·L / Σ m
    if agg == "sequence":
        per_sequence = masked_mean(per_token, keep, dim=-1)  # (B,): Σ_t m·L / Σ_t m
        if denominator is not None:
            return torch.where(keep.any(-1), per_sequence, 0).sum() / denominator  # Σ_i L_i / N_sequences
        return masked_mean(per_sequence, keep.any(-1))  # over rows with at least one token
    raise ValueError(f"unknown aggregation {agg!r}: expected 'token' or 'sequence'")
