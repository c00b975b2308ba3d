"""PPO objectives on (batch, time) response tensors: the policy losses (the registry `POLICY_LOSSES`, keyed by
`learner.policy_loss`), their aggregation over tokens and sequences (the registry `LOSS_AGGREGATIONS`, keyed
by `learner.loss_agg_mode`), and the clipped value loss. Both registries are `contracts.registry`'s.

Every policy loss has one signature:

    @POLICY_LOSSES.register("name")
    def name(ratio, advantages, cfg) -> (per-token loss, clipped)

ratio ρ = π / π_old and advantages: (B, T); cfg: the `LearnerConfig` (clip_eps, clip_eps_high,
dual_clip_c); per-token loss (B, T), to be minimised; clipped (B, T) bool, true where a clip or bound
is the active term.

A loss aggregation is a sum over a (B, T) per-token loss, and the count it is divided by, its entry's
`denominator`: of valid tokens, or of non-empty sequences. Given a `denominator` (the whole minibatch's
count across micro-batches and ranks, `loss_denominator`, which the update takes once per step) a loss
returns this piece's share of the minibatch's loss, so the shares of every micro-batch on every rank add
up to it; without one it is the piece's own mean.

Masking follows `learner.advantages`: `mask` is (B, T), true on each row's valid response tokens.
Inputs are zeroed on padding before any arithmetic, so garbage there (inf, nan) reaches neither the
loss nor its gradient.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from contracts.config import LearnerConfig
from contracts.registry import Registry
from learner.advantages import masked_mean

PolicyLossFn = Callable[[torch.Tensor, torch.Tensor, LearnerConfig], tuple[torch.Tensor, torch.Tensor]]
POLICY_LOSSES: Registry[PolicyLossFn] = Registry("policy loss", "learner.policy_loss")

# (masked per-token loss (B, T), keep (B, T) bool, C) -> the 0-dim sum its denominator divides. Each entry's
# attribute `denominator` counts what the sum is divided by from the rows' valid tokens (B,) (numpy or torch).
AggregationFn = Callable[[torch.Tensor, torch.Tensor, float | None], torch.Tensor]
LOSS_AGGREGATIONS: Registry[AggregationFn] = Registry("loss aggregation", "learner.loss_agg_mode")


def clip_range(cfg: LearnerConfig) -> tuple[float, float]:
    """(1 − ε_low, 1 + ε_high): clip-higher (DAPO) raises only the upper bound; symmetric by default."""
    high = cfg.clip_eps if cfg.clip_eps_high is None else cfg.clip_eps_high
    return 1.0 - cfg.clip_eps, 1.0 + high


@POLICY_LOSSES.register("ppo_clip")
def ppo_clip(ratio: torch.Tensor, advantages: torch.Tensor, cfg: LearnerConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate (Schulman et al. 2017), per token."""
    low, high = clip_range(cfg)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, low, high)
    return torch.maximum(unclipped, clipped), clipped > unclipped  # L_t = max(−A·ρ, −A·clip(ρ, 1−ε_l, 1+ε_h))


@POLICY_LOSSES.register("dual_clip")
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
    if cfg.ratio_level == "sequence":
        ratio = torch.exp(gspo_log_ratio(logprobs, log_ratio, keep))  # s_i,t = sg[s_i]·π_t / sg[π_t]
    else:
        ratio = torch.exp(log_ratio)  # ρ_t = π(a_t) / π_old(a_t)
    per_token, clipped = POLICY_LOSSES.lookup(cfg.policy_loss)(ratio, advantages, cfg)
    if weights is not None:
        per_token = torch.where(keep, weights, 0) * per_token  # w_t·L_t
    loss = aggregate(per_token, keep, cfg.loss_agg_mode, denominator, cfg.loss_agg_norm_tokens)
    with torch.no_grad():
        dtype = per_token.dtype
        stats = {
            "clip_frac": masked_mean(clipped.to(dtype), keep),
            "clip_frac_high": masked_mean((clipped & (ratio > 1)).to(dtype), keep),
            "clip_frac_low": masked_mean((clipped & (ratio < 1)).to(dtype), keep),
            "approx_kl": masked_mean(torch.expm1(log_ratio) - log_ratio, keep),  # (ρ − 1) − log ρ
            # A count, not a share: the update divides the minibatch's sum by its sequences.
            "clipped_sequences": (clipped & keep).any(-1).sum().to(dtype),
        }
    return loss, stats


def sequence_log_ratio(log_ratio: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """(B, T) token log ratios, zero off `keep` -> (B,) log of their geometric mean, 0 for an empty row."""
    return log_ratio.sum(-1) / keep.sum(-1).clamp(min=1)  # log s_i = (1/|y_i|) Σ_t log ρ_t


def gspo_log_ratio(logprobs: torch.Tensor, log_ratio: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """GSPO-token (Zheng et al. 2025): every token's log ratio is its sequence's length-normalised one, log s_i,
    while its gradient is that of its own logprob, so ∇ s_i,t = s_i·∇ log π_t, GSPO's gradient for a sequence-level
    advantage. logprobs (current policy, with grad), log_ratio (log π − log π_old, zero off keep), keep: (B, T) ->
    (B, T), zero off keep."""
    sequence = sequence_log_ratio(log_ratio.detach(), keep)
    return torch.where(keep, sequence[:, None] + logprobs - logprobs.detach(), 0)  # log s_i + log π_t − sg[log π_t]


def rollout_correction(
    log_ratio: torch.Tensor, keep: torch.Tensor, mode: str, lower: float, upper: float
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Weights that correct for the engine sampling from π_behaviour rather than the learner's π_old
    (`learner.rollout_correction`): log_ratio = log π_old − log π_behaviour, keep: (B, T) -> (weights (B, T)
    detached, or None for mode `none`; affected (B, T) bool, the tokens whose weight was capped or masked).
    `token_tis`: min(ρ_t, upper); `sequence_tis`: min(Π_t ρ_t, upper) on every token of the sequence;
    `token_mask` (IcePop): 1 where lower ≤ ρ_t ≤ upper, else 0; `sequence_mask`: 1 where the geometric mean
    s_i = exp(mean_t log ρ_t) is within [lower, upper], else 0 on the whole sequence."""
    log_ratio = torch.where(keep, log_ratio, 0).detach()
    log_lower, log_upper = math.log(lower), math.log(upper)
    if mode == "none":
        return None, torch.zeros_like(keep)
    if mode == "token_tis":
        weights = torch.exp(log_ratio.clamp(max=log_upper))  # w_t = min(ρ_t, U)
        return torch.where(keep, weights, 0), keep & (log_ratio > log_upper)
    if mode == "sequence_tis":
        total = log_ratio.sum(-1, keepdim=True)  # log Π_t ρ_t, capped before exp so it cannot overflow
        weights = torch.exp(total.clamp(max=log_upper)).expand_as(log_ratio)  # w_i = min(Π_t ρ_t, U)
        return torch.where(keep, weights, 0), keep & (total > log_upper)
    if mode == "token_mask":
        inside = (log_ratio >= log_lower) & (log_ratio <= log_upper)  # L ≤ ρ_t ≤ U
        return (inside & keep).to(log_ratio.dtype), keep & ~inside
    if mode == "sequence_mask":
        mean = sequence_log_ratio(log_ratio, keep)[:, None]
        inside = (mean >= log_lower) & (mean <= log_upper)  # L ≤ s_i ≤ U
        return (inside & keep).to(log_ratio.dtype), keep & ~inside
    raise ValueError(f"learner.rollout_correction.mode {mode!r}: one of {', '.join(ROLLOUT_CORRECTIONS)}")


ROLLOUT_CORRECTIONS = ("none", "token_tis", "sequence_tis", "token_mask", "sequence_mask")


def mismatch(log_ratio: torch.Tensor, keep: torch.Tensor) -> dict[str, torch.Tensor]:
    """How far the learner's logprobs are from the engine's for the same weights: log_ratio = log π_old −
    log π_behaviour, keep: (B, T), true on the tokens of samples from the learner's current weights -> 0-dim
    figures, computed without a host sync. "kl": the k3 estimate of KL(π_behaviour ‖ π_old) per token, mean;
    "log_ratio_abs_max": the largest |log ρ_t|; "ppl_ratio": each sequence's perplexity under the learner over
    the engine's, mean over sequences; "tokens": how many tokens they are over (0: the figures mean nothing)."""
    log_ratio = torch.where(keep, log_ratio, 0)
    ppl = torch.exp(-sequence_log_ratio(log_ratio, keep))  # exp(−mean_t log π_old) / exp(−mean_t log π_behaviour)
    return {
        "kl": masked_mean(torch.expm1(log_ratio) - log_ratio, keep),  # (ρ − 1) − log ρ
        "log_ratio_abs_max": torch.cat([log_ratio.abs().flatten(), log_ratio.new_zeros(1)]).amax(),  # 0 if empty
        "ppl_ratio": masked_mean(ppl, keep.any(-1)),
        "tokens": keep.sum().to(log_ratio.dtype),
    }


def tokens(lengths):
    """N_tokens = Σ_i T_i: every valid token. lengths: (B,) valid tokens per row, numpy or torch."""
    return lengths.sum()


def sequences(lengths):
    """N_sequences = #{i : T_i > 0}: the sequences with at least one valid token. lengths: (B,)."""
    return (lengths > 0).sum()


@LOSS_AGGREGATIONS.register("token_mean", denominator=tokens)
def token_mean(masked: torch.Tensor, keep: torch.Tensor, norm: float | None) -> torch.Tensor:
    """Every valid token alike: long responses weigh more."""
    return masked.sum()  # Σ_i Σ_t m·L_it


@LOSS_AGGREGATIONS.register("seq_mean_token_sum", denominator=sequences)
def seq_mean_token_sum(masked: torch.Tensor, keep: torch.Tensor, norm: float | None) -> torch.Tensor:
    """Each sequence's loss the sum of its tokens'."""
    return masked.sum(-1).sum()  # Σ_i Σ_t m·L_it


@LOSS_AGGREGATIONS.register("seq_mean_token_mean", denominator=sequences)
def seq_mean_token_mean(masked: torch.Tensor, keep: torch.Tensor, norm: float | None) -> torch.Tensor:
    """Each sequence's loss the mean of its tokens'."""
    return (masked.sum(-1) / keep.sum(-1).clamp(min=1)).sum()  # Σ_i Σ_t m·L_it / T_i


@LOSS_AGGREGATIONS.register("seq_mean_token_sum_norm", denominator=sequences)
def seq_mean_token_sum_norm(masked: torch.Tensor, keep: torch.Tensor, norm: float | None) -> torch.Tensor:
    """Each sequence's loss the sum of its tokens' over a constant C, `learner.loss_agg_norm_tokens` (Dr. GRPO:
    no length bias either way), which start-up resolves to rollout.sampling.max_tokens when the config
    leaves it null."""
    if norm is None:
        raise ValueError("learner.loss_agg_norm_tokens is unresolved: set it (or load the job's config)")
    return (masked.sum(-1) / float(norm)).sum()  # Σ_i Σ_t m·L_it / C


def loss_denominator(mode: str, lengths):
    """What a `mode` loss is divided by, from each row's valid tokens `lengths` (B,), numpy or torch: its
    valid tokens (token_mean) or its non-empty sequences (the seq_mean_* modes)."""
    return LOSS_AGGREGATIONS.entry(mode).attributes["denominator"](lengths)


def aggregate(
    per_token: torch.Tensor,
    keep: torch.Tensor,
    mode: str,
    denominator: float | None = None,
    norm: float | None = None,
) -> torch.Tensor:
    """Reduce a (B, T) per-token loss to a 0-dim one by the aggregation `mode` (`learner.loss_agg_mode`):
    its sum over `denominator`, the minibatch's count of valid tokens (token_mean) or of non-empty
    sequences (the others); None counts this piece's own. `norm`: C of `seq_mean_token_sum_norm`."""
    masked = torch.where(keep, per_token, 0)
    total = LOSS_AGGREGATIONS.lookup(mode)(masked, keep, norm)
    count = loss_denominator(mode, keep.sum(-1)).clamp(min=1) if denominator is None else denominator
    return total / count  # Σ L / N


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
