"""PPO objectives on (batch, time) response tensors: the clipped policy loss and the clipped value loss.

Both reduce to a mean by default; given a `denominator` (the whole minibatch's count of valid
tokens, or of non-empty sequences, across micro-batches and ranks) they return this piece's share
of it, so the shares of every micro-batch on every rank add up to the minibatch's mean.

Masking follows `learner.advantages`: `mask` is (B, T), true on each row's valid response tokens.
Inputs are zeroed on padding before any arithmetic, so garbage there (inf, nan) reaches neither the
loss nor its gradient.
"""

from __future__ import annotations

from typing import Literal

import torch

from learner.advantages import masked_mean

Aggregation = Literal["token", "sequence"]


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float,
    agg: Aggregation = "token",
    denominator: float | None = None,
    weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO's clipped surrogate loss (Schulman et al. 2017), to be minimised.

    `weights` (B, T), detached, scale each token's term: decoupled PPO (Hilton et al. 2022) passes
    the truncated importance weight min(π_old / π_behaviour, cap) of samples drawn by other weights.

    logprobs (current policy), old_logprobs (the policy that sampled), advantages, mask: (B, T) ->
    (0-dim loss, stats). `agg` "token" averages over all valid tokens, so long responses weigh more;
    "sequence" averages within each response first, then over responses with at least one token.
    stats (0-dim, detached): "clip_frac", the share of valid tokens where the clipped term is the
    active one, and "approx_kl", the k3 estimate of KL(old || current).
    """
    keep = mask.bool()
    log_ratio = torch.where(keep, logprobs - old_logprobs, 0)
    advantages = torch.where(keep, advantages, 0)
    ratio = torch.exp(log_ratio)  # ρ_t = π(a_t) / π_old(a_t)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
    per_token = torch.maximum(unclipped, clipped)  # L_t = max(−A·ρ, −A·clip(ρ, 1−ε, 1+ε))
    if weights is not None:
        per_token = torch.where(keep, weights, 0) * per_token  # w_t·L_t
    loss = _aggregate(per_token, keep, agg, denominator)
    with torch.no_grad():
        stats = {
            "clip_frac": masked_mean((clipped > unclipped).to(per_token.dtype), keep),
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


def _aggregate(per_token: torch.Tensor, keep: torch.Tensor, agg: Aggregation,
               denominator: float | None) -> torch.Tensor:
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
