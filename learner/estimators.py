"""Advantage estimators: the registry `ESTIMATORS` (`contracts.registry`), each estimator added by its
decorator with whether it needs the critic's values and whether it compares a prompt group's samples,
and read by the job (`learner.estimator`) and `rollout replay` (`--estimator`).

Every estimator has one signature:

    estimator(token_rewards, values, mask, groups, cfg) -> (advantages, returns)

token_rewards, values, mask: (B, T) response tensors (values None for a critic-free estimator);
groups: (B,) int64, the index in [0, G) of each row's prompt group (same prompt, same iteration);
cfg: the `LearnerConfig` (gamma, lam, grpo_normalize_std). Both outputs are (B, T), zero on padding.

- `gae`: generalised advantage estimation with the critic's values (`learner.advantages.gae`).
- `grpo`, `rloo`: group baselines, critic-free. Each sample's return is its KL-penalised sequence
  reward R_i = Σ_t r_t (score minus β·Σ kl), judged against the other samples of its prompt, so
  they need a group of n > 1 samples per prompt (`grouped`). Their math runs in float64: the group
  means are sums of thousands of rewards when a run's n and prompt count are large. Replay runs them
  over a whole archive at once by passing each sample's reward as a one-token row.
- `reinforce_pp`: REINFORCE++ (Hu 2025), critic-free: the discounted return-to-go of the
  KL-penalised token rewards, whitened over the whole batch by the update (`whiten_advantages`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from contracts.config import ConfigError, LearnerConfig
from contracts.registry import Registry
from learner.advantages import (
    KL_ESTIMATORS,
    compact,
    discounted_reverse_cumsum,
    expand,
    gae,
    has_holes,
    model_tokens_first,
)
from learner.losses import LOSS_AGGREGATIONS, POLICY_LOSSES

GRPO_EPS = 1e-6  # keeps a group of identical rewards at advantage 0 instead of 0 / 0

EstimatorFn = Callable[
    [torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor, LearnerConfig], tuple[torch.Tensor, torch.Tensor]
]

# Each entry's attributes: needs_critic (it reads the critic's values) and grouped (it compares the samples of
# a prompt group: then n > 1 samples per prompt, and replay runs it over the whole archive).
ESTIMATORS: Registry[EstimatorFn] = Registry("advantage estimator", "learner.estimator")


@dataclass(frozen=True)
class Estimator:
    """One registry entry: the function, whether it needs the critic's values, and whether it compares the
    samples of a prompt group."""

    fn: EstimatorFn
    needs_critic: bool
    grouped: bool


def estimator(name: str) -> Estimator:
    """The estimator `name`; ConfigError naming `learner.estimator` and the known names when there is none."""
    entry = ESTIMATORS.entry(name)
    return Estimator(entry.value, **entry.attributes)


def estimate(
    token_rewards: torch.Tensor,
    values: torch.Tensor | None,
    mask: torch.Tensor,
    groups: torch.Tensor,
    cfg: LearnerConfig,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages, returns) by the estimator `cfg.estimator`; shapes as in the module docstring.

    An episode's environment tokens are holes in `mask`: the estimator runs over the model's tokens
    alone, packed together (so GAE bootstraps across an environment's turn, and a discount counts the
    model's tokens only), and its outputs go back to their places, zero at the holes."""
    fn = estimator(cfg.estimator).fn
    if not has_holes(mask):
        return fn(token_rewards, values, mask, groups, cfg)
    order = model_tokens_first(mask)
    packed = [None if x is None else compact(x, order) for x in (token_rewards, values, mask)]
    advantages, returns = fn(*packed[:2], packed[2], groups, cfg)
    return expand(advantages, order), expand(returns, order)


# --- group baselines ------------------------------------------------------------------------------


def group_counts(groups: torch.Tensor, n_groups: int) -> torch.Tensor:
    """Samples per group. groups: (N,) int64 in [0, G) -> (G,) int64.

    Raises ValueError when a group has fewer than two samples: a baseline from the *other*
    samples of a prompt does not exist for a prompt sampled once.
    """
    counts = torch.bincount(groups, minlength=n_groups)
    lonely = int((counts < 2).sum())
    if lonely:
        raise ValueError(
            f"{lonely} of {n_groups} prompt groups hold a single sample: group baselines compare each "
            "completion with the others of its prompt, so they need n > 1 completions per prompt "
            "(rollout.n_samples >= 2); use the gae estimator for this archive"
        )
    return counts


def _group_sum(x: torch.Tensor, groups: torch.Tensor, n_groups: int) -> torch.Tensor:
    """Σ of x over each group. x: (N,), groups: (N,) -> (G,)."""
    return torch.zeros(n_groups, dtype=x.dtype, device=x.device).index_add_(0, groups, x)


def grpo_advantages(
    rewards: torch.Tensor, groups: torch.Tensor, normalize_std: bool = True, eps: float = GRPO_EPS
) -> torch.Tensor:
    """GRPO (Shao et al. 2024): each reward centred, and by default standardised, within its prompt group.

    rewards: (N,), groups: (N,) int64 -> (N,) float64. A_i = (r_i − mean_g) / (std_g + eps), with the
    unbiased (n − 1) standard deviation of the group, as torch.std and TRL's GRPO use; with
    `normalize_std` false, A_i = r_i − mean_g (Dr. GRPO: the division favours groups of low spread).
    """
    r = rewards.to(torch.float64)
    n_groups = int(groups.max()) + 1 if groups.numel() else 0
    counts = group_counts(groups, n_groups).to(torch.float64)
    mean = (_group_sum(r, groups, n_groups) / counts)[groups]
    centred = r - mean
    if not normalize_std:
        return centred
    variance = _group_sum(centred.square(), groups, n_groups) / (counts - 1)  # Σ (r − μ)² / (n − 1)
    return centred / (variance.sqrt()[groups] + eps)


def rloo_advantages(rewards: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """RLOO (Ahmadian et al. 2024): each reward minus the mean of the other n − 1 in its group.

    rewards: (N,), groups: (N,) int64 -> (N,) float64. A_i = r_i − (S_g − r_i) / (n_g − 1), S_g the
    group's reward sum; unbiased because the baseline does not depend on sample i.
    """
    r = rewards.to(torch.float64)
    n_groups = int(groups.max()) + 1 if groups.numel() else 0
    counts = group_counts(groups, n_groups).to(torch.float64)
    others = _group_sum(r, groups, n_groups)[groups] - r
    return r - others / (counts[groups] - 1)


def broadcast(advantages: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """A sequence advantage on every valid token of its row. advantages: (B,), mask: (B, T) -> (B, T),
    zero on padding."""
    return torch.where(mask.bool(), advantages.unsqueeze(-1), 0)


def sequence_returns(token_rewards: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """R_i = Σ_t r_t over each row's valid tokens (score − β·Σ kl). (B, T) -> (B,) float32."""
    return torch.where(mask.bool(), token_rewards.float(), 0).sum(-1)


# --- the registered estimators --------------------------------------------------------------------


@ESTIMATORS.register("gae", needs_critic=True, grouped=False)
def gae_estimator(token_rewards, values, mask, groups, cfg: LearnerConfig):
    return gae(token_rewards, values, mask, cfg.gamma, cfg.lam)


@ESTIMATORS.register("grpo", needs_critic=False, grouped=True)
def grpo_estimator(token_rewards, values, mask, groups, cfg: LearnerConfig):
    returns = sequence_returns(token_rewards, mask)
    advantages = broadcast(grpo_advantages(returns, groups, cfg.grpo_normalize_std), mask).float()
    return advantages, advantages


@ESTIMATORS.register("rloo", needs_critic=False, grouped=True)
def rloo_estimator(token_rewards, values, mask, groups, cfg: LearnerConfig):
    advantages = broadcast(rloo_advantages(sequence_returns(token_rewards, mask), groups), mask).float()
    return advantages, advantages


@ESTIMATORS.register("reinforce_pp", needs_critic=False, grouped=False)
def reinforce_pp_estimator(token_rewards, values, mask, groups, cfg: LearnerConfig):
    """REINFORCE++ returns, (B, T), zero on padding; the update whitens them into advantages."""
    keep = mask.bool()
    rewards = torch.where(keep, token_rewards.float(), 0)
    returns = torch.where(keep, discounted_reverse_cumsum(rewards, cfg.gamma), 0)  # G_t = Σ_{k≥t} γ^(k−t) r_k
    return returns, returns


def check_learner_names(cfg: LearnerConfig, n_samples: int) -> None:
    """The config's estimator, policy loss, loss aggregation and KL estimator are registered, and a grouped
    estimator has groups to compare; ConfigError naming the field otherwise (called at start-up, before any
    actor)."""
    entry = estimator(cfg.estimator)
    POLICY_LOSSES.entry(cfg.policy_loss)
    LOSS_AGGREGATIONS.entry(cfg.loss_agg_mode)
    KL_ESTIMATORS.entry(cfg.kl.estimator)
    if entry.grouped and n_samples < 2:
        raise ConfigError(
            f"learner.estimator {cfg.estimator} compares the samples of each prompt, so it needs "
            f"rollout.n_samples >= 2 (it is {n_samples}): raise n_samples or use gae"
        )
