"""PPO objectives on (batch, time) response tensors: the policy losses, a registry (`POLICY_LOSSES`, filled
by the `register_policy_loss` decorator, keyed by `learner.policy_loss`), their aggregation over tokens
and sequences (`learner.loss_agg_mode`), and the clipped value loss.

Every policy loss has one signature:

    policy_loss_fn(ratio, advantages, cfg) -> (per-token loss, clipped)

ratio ρ = π / π_old and advantages: (B, T); cfg: the `LearnerConfig` (clip_eps, clip_eps_high,
dual_clip_c); per-token loss (B, T), to be minimised; clipped (B, T) bool, true where a clip or bound
is the active term.

Given a `denominator` (the whole minibatch's count of valid tokens, or of non-empty sequences, across
micro-batches and ranks) a loss returns this piece's share of the minibatch's loss, so the shares of
every micro-batch on every rank add up to it; without one it is the piece's own mean.

Masking follows `learner.advantages`: `mask` is (B, T), true on each row's valid response tokens.
Inputs are zeroed on padding before any arithmetic, so garbage there (inf, nan) reaches neither the
loss nor its gradient.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from contracts.config import ConfigError, LearnerConfig
from learner.advantages import masked_mean

PolicyLossFn = Callable[[torch.Tensor, torch.Tensor, LearnerConfig], tuple[torch.Tensor, torch.Tensor]]
POLICY_LOSSES: dict[str, PolicyLossFn] = {}


def register_policy_loss(name: str):
    """Decorator: add a policy loss of the signature above to `POLICY_LOSSES` under `name`."""

    def register(fn: PolicyLossFn) -> PolicyLossFn:
        if name in POLICY_LOSSES:
            raise ValueError(f"policy loss {name!r} is registered twice")
        POLICY_LOSSES[name] = fn
        return fn

    return register


def policy_loss_fn(name: str) -> PolicyLossFn:
    try:
        return POLICY_LOSSES[name]
    except KeyError:
        raise ConfigError(
            f"learner.policy_loss: unknown policy loss {name!r}; registered: {', '.join(POLICY_LOSSES)}"
        ) from None


def clip_range(cfg: LearnerConfig) -> tuple[float, float]:
    """(1 − ε_low, 1 + ε_high): clip-higher (DAPO) raises only the upper bound; symmetric by default."""
    high = cfg.clip_eps if cfg.clip_eps_high is None else cfg.clip_eps_high
    return 1.0 - cfg.clip_eps, 1.0 + high


@register_policy_loss("ppo_clip")
def ppo_clip(ratio: torch.Tensor, advantages: torch.Tensor, cfg: LearnerConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate (Schulman et al. 2017), per token."""
    low, high = clip_range(cfg)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, low, high)
    return torch.maximum(unclipped, clipped), clipped > unclipped  # L_t = max(−A·ρ, −A·clip(ρ, 1−ε_l, 1+ε_h))


@register_policy_loss("dual_clip")
def dual_clip(ratio: torch.Tensor, advantages: torch.Tensor, cfg: LearnerConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Dual-clip PPO (Ye et al. 2020): where A < 0, the clipped loss is bounded by −c·A, so a huge ratio
    (which the plain clip leaves unbounded for a negative advantage) adds at most c·|A|. A token held at
    the bound counts as clipped."""
    loss, clipped = ppo_clip(ratio, advantages, cfg)
    bound = -cfg.dual_clip_c * advantages
    held = (advantages < 0) & (loss > bound)
    return torch.where(held, bound, loss), clipped | held  # L_t = min(L_t, −c·A) where A < 0


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    cfg: LearnerConfig,
    denominator: float | None = None,
    weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The policy loss `cfg.policy_loss`, aggregated by `cfg.loss_agg_mode`, to be minimised.

    logprobs (current policy), old_logprobs (the proximal policy), advantages, mask: (B, T) -> (0-dim
    loss, stats). `weights` (B, T), detached, scale each token's term: decoupled PPO (Hilton et al.
    2022) passes the truncated importance weight min(π_old / π_behaviour, cap) of samples drawn by
    other weights. stats (0-dim, detached, shares of this piece's valid tokens): "clip_frac", where a
    clip or bound is the active term, split into "clip_frac_high" (ratio above 1) and "clip_frac_low"
    (below), and "approx_kl", the k3 estimate of KL(old || current).
    """
    keep = mask.bool()
    log_ratio = torch.where(keep, logprobs - old_logprobs, 0)
    advantages = torch.where(keep, advantages, 0)
    ratio = torch.exp(log_ratio)  # ρ_t = π(a_t) / π_old(a_t)
    per_token, clipped = policy_loss_fn(cfg.policy_loss)(ratio, advantages, cfg)
    if weights is not None:
        per_token = torch.where(keep, weights, 0) * per_token  # w_t·L_t
    loss = aggregate(per_token, keep, cfg.loss_agg_mode, denominator, norm_tokens(cfg))
    with torch.no_grad():
        dtype = per_token.dtype
        stats = {
            "clip_frac": masked_mean(clipped.to(dtype), keep),
            "clip_frac_high": masked_mean((clipped & (ratio > 1)).to(dtype), keep),
            "clip_frac_low": masked_mean((clipped & (ratio < 1)).to(dtype), keep),
            "approx_kl": masked_mean(torch.expm1(log_ratio) - log_ratio, keep),  # (ρ − 1) − log ρ
        }
    return loss, stats


def norm_tokens(cfg: LearnerConfig) -> float:
    """The constant C of `seq_mean_token_sum_norm`: learner.loss_agg_norm_tokens, which start-up resolves
    to rollout.sampling.max_tokens when the config leaves it null."""
    if cfg.loss_agg_norm_tokens is None:
        if cfg.loss_agg_mode == "seq_mean_token_sum_norm":
            raise ValueError("learner.loss_agg_norm_tokens is unresolved: set it (or load the job's config)")
        return 1.0
    return float(cfg.loss_agg_norm_tokens)


def aggregate(
    per_token: torch.Tensor, keep: torch.Tensor, mode: str, denominator: float | None = None, norm: float = 1.0
) -> torch.Tensor:
    """Reduce a (B, T) per-token loss to a 0-dim one (`learner.loss_agg_mode`).

    `token_mean` weighs every valid token alike (long responses weigh more); the `seq_mean_*` modes
    average over sequences with at least one token, each sequence's loss being the sum of its tokens'
    (`_token_sum`), their mean (`_token_mean`) or their sum over a constant C (`_token_sum_norm`, Dr. GRPO:
    no length bias either way). `denominator`: the minibatch's count of valid tokens (token_mean) or of
    non-empty sequences (the others); None counts this piece's own.
    """
    masked = torch.where(keep, per_token, 0)
    if mode == "token_mean":
        count = keep.sum().clamp(min=1) if denominator is None else denominator
        return masked.sum() / count  # Σ_i Σ_t m·L_it / N_tokens
    per_sequence = masked.sum(-1)  # Σ_t m·L_it
    if mode == "seq_mean_token_mean":
        per_sequence = per_sequence / keep.sum(-1).clamp(min=1)  # Σ_t m·L_it / T_i
    elif mode == "seq_mean_token_sum_norm":
        per_sequence = per_sequence / norm  # Σ_t m·L_it / C
    elif mode != "seq_mean_token_sum":
        raise ValueError(f"unknown loss aggregation {mode!r}")
    count = keep.any(-1).sum().clamp(min=1) if denominator is None else denominator
    return per_sequence.sum() / count  # Σ_i L_i / N_sequences


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
    loss = 0.5 * aggregate(worst, keep, "token_mean", denominator)  # ½ Σ m·max((V−R)², (V_c−R)²) / N_tokens
    with torch.no_grad():
        stats = {"value_clip_frac": masked_mean((clipped > unclipped).to(unclipped.dtype), keep)}
    return loss, stats
