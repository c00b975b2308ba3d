"""Advantage estimators, one registry for the job and `rollout replay`: `estimate(name, ...)`.

- `gae`: generalised advantage estimation with the critic's values (`learner.advantages.gae`).
- `grpo`, `rloo`: group baselines, critic-free. Each sample's return is its KL-penalised sequence
  reward Σ_t r_t (score minus β·Σ kl), judged against the other samples of its prompt.
- `reinforce_pp`: REINFORCE++ (Hu 2025), critic-free: the discounted return-to-go of the
  KL-penalised token rewards, whitened over the whole batch by the update (`whiten_advantages`).

GRPO and RLOO judge a completion against the other completions of the same prompt, so they need a group of
n > 1 samples per prompt. They act on whole sequences: `rewards` and `groups` are (N,) tensors, N
samples, `groups[i]` the index in [0, G) of sample i's prompt group, and they return (N,) sequence
advantages; `broadcast` spreads those over the (N, T) response tokens. Math runs in float64: the
group means are sums of thousands of rewards when a run's n and prompt count are large.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import get_args

import torch

from contracts.config import EstimatorName
from learner.advantages import discounted_reverse_cumsum, gae

GRPO_EPS = 1e-6  # keeps a group of identical rewards at advantage 0 instead of 0 / 0


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


def grpo_advantages(rewards: torch.Tensor, groups: torch.Tensor, eps: float = GRPO_EPS) -> torch.Tensor:
    """GRPO (Shao et al. 2024): each reward standardised within its prompt group.

    rewards: (N,), groups: (N,) int64 -> (N,) float64. A_i = (r_i − mean_g) / (std_g + eps), with
    the unbiased (n − 1) standard deviation of the group, as torch.std and TRL's GRPO use.
    """
    r = rewards.to(torch.float64)
    n_groups = int(groups.max()) + 1 if groups.numel() else 0
    counts = group_counts(groups, n_groups).to(torch.float64)
    mean = (_group_sum(r, groups, n_groups) / counts)[groups]
    centred = r - mean
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


def reinforce_pp_returns(token_rewards: torch.Tensor, mask: torch.Tensor, gamma: float) -> torch.Tensor:
    """REINFORCE++ returns. token_rewards, mask: (B, T) -> (B, T), zero on padding."""
    keep = mask.bool()
    rewards = torch.where(keep, token_rewards.float(), 0)
    return torch.where(keep, discounted_reverse_cumsum(rewards, gamma), 0)  # G_t = Σ_{k≥t} γ^(k−t) r_k


GroupBaseline = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Estimator:
    """One registry entry. `group` is set for a group-baseline estimator: (N,) sequence rewards and their
    (N,) prompt-group indices -> (N,) advantages; replay calls it on a whole archive's rewards."""

    needs_critic: bool
    group: GroupBaseline | None = None


ESTIMATORS: dict[str, Estimator] = {
    "gae": Estimator(needs_critic=True),
    "grpo": Estimator(needs_critic=False, group=grpo_advantages),
    "rloo": Estimator(needs_critic=False, group=rloo_advantages),
    "reinforce_pp": Estimator(needs_critic=False),
}
# The config (contracts/, which imports no learner code) spells the names as a Literal; the two must agree.
if set(ESTIMATORS) != set(get_args(EstimatorName)):
    raise ImportError(
        f"learner.estimators {sorted(ESTIMATORS)} and contracts.config.EstimatorName "
        f"{sorted(get_args(EstimatorName))} disagree: add the name to both"
    )


def estimator(name: str) -> Estimator:
    try:
        return ESTIMATORS[name]
    except KeyError:
        raise ValueError(f"unknown advantage estimator {name!r}; expected one of {', '.join(ESTIMATORS)}") from None


def estimate(
    name: str,
    token_rewards: torch.Tensor,
    values: torch.Tensor | None,
    mask: torch.Tensor,
    groups: torch.Tensor,
    gamma: float,
    lam: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages, returns), both (B, T) and zero on padding, by the estimator `name`.

    token_rewards, values, mask: (B, T); groups: (B,) int64 prompt-group index of each row.
    """
    entry = estimator(name)
    if entry.needs_critic:
        return gae(token_rewards, values, mask, gamma, lam)
    if entry.group is not None:
        keep = mask.bool()
        sequence_return = torch.where(keep, token_rewards.float(), 0).sum(-1)  # R_i = Σ_t r_t = score − β·Σ_t kl_t
        advantages = broadcast(entry.group(sequence_return, groups), keep).float()
        return advantages, advantages
    returns = reinforce_pp_returns(token_rewards, mask, gamma)
    return returns, returns
