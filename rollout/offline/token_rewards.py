"""Replay's token rewards: the stored ones, or rebuilt as −β·kl_t plus the (new) score on the last token,
with an episode's turn rewards on the tokens they land on (`rollout replay`'s docstring says when each)."""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import torch

from learner.advantages import kl_penalty, last_token_mask
from learner.estimators import estimator
from rollout.offline.ragged import floats, lengths_of, padded, required, required_column
from rollout.offline.rescore import ReplayError

if TYPE_CHECKING:
    from rollout.offline.replay import _Plan as ReplayPlan


def rebuilt_token_rewards(
    batch: pa.RecordBatch, reward: pa.Array, plan: ReplayPlan, lengths: np.ndarray, mask: torch.Tensor
) -> torch.Tensor | None:
    """(B, T) token rewards: stored, or rebuilt as −β·kl_t plus the (new) score on the last token, and an
    episode's turn rewards; `mask`: the model's tokens."""
    stored = batch.column("token_rewards")
    if stored.null_count:
        if estimator(plan.estimator).needs_critic:
            raise ReplayError(
                "the archive has no learner columns (token_rewards, values are null, as "
                "`rollout generate` writes them): GAE needs them; use --estimator grpo or rloo"
            )
        return None
    rewards = padded(required(batch, "token_rewards", lengths), mask.shape[1])
    if not plan.rescore and plan.kl_coef is None:
        return rewards
    last = last_token_mask(mask)
    old_score = torch.from_numpy(floats(batch.column("reward"), "reward")).unsqueeze(1)
    if plan.kl_coef is None:
        kl_part = rewards - torch.where(last, old_score, 0)  # −β·kl_t, as the run computed it
    elif plan.distilled:  # a teacher's per-token reward is in the stored ones, and nowhere else: kept
        coef = torch.from_numpy(floats(batch.column("kl_coef"), "kl_coef")).unsqueeze(1)
        kl = _kl(batch, plan, lengths, mask)
        kl_part = rewards - torch.where(last, old_score, 0) + (coef - plan.kl_coef) * kl  # r_t − score + (β − β')·kl_t
    else:
        kl_part = -plan.kl_coef * _kl(batch, plan, lengths, mask) + turn_rewards(batch, mask.shape[1])
    new_score = torch.from_numpy(floats(reward, "reward")).unsqueeze(1)
    return torch.where(mask, kl_part, 0) + torch.where(last, new_score, 0)


def turn_rewards(batch: pa.RecordBatch, width: int) -> torch.Tensor:
    """(B, T) an episode's turn rewards on the tokens they land on; zero for single completions."""
    at = batch.column("turn_reward_at")
    out = torch.zeros((batch.num_rows, width))
    counts = lengths_of(at)
    if counts.sum():
        rows = torch.from_numpy(np.repeat(np.arange(batch.num_rows), counts))
        columns = torch.from_numpy(at.flatten().to_numpy().astype(np.int64))
        out.index_put_(
            (rows, columns),
            torch.from_numpy(floats(batch.column("turn_rewards").flatten(), "turn_rewards")),
            accumulate=True,
        )
    return out


def _kl(batch: pa.RecordBatch, plan: ReplayPlan, lengths: np.ndarray, mask: torch.Tensor) -> torch.Tensor:
    """(B, T) per-token KL: the `kl` column; estimated from the logprobs where the run's β was 0."""
    column = batch.column("kl")
    missing = column.is_null().to_numpy(zero_copy_only=False)
    if not missing.any():
        return padded(required_column(column, "kl", lengths), mask.shape[1])
    coef = batch.column("kl_coef").to_numpy(zero_copy_only=False)  # NaN where unknown
    unknown = np.isnan(coef) & missing
    if unknown.any():
        iterations = sorted(set(batch.column("iteration").to_numpy()[unknown].tolist()))
        raise ReplayError(
            f"the KL coefficient the run used in iteration(s) {iterations[:5]} is unknown (a v1 archive of an "
            "adaptive controller, and no metrics.jsonl beside it to read it from): cannot rebuild its KL"
        )
    warnings.warn(
        "the run's KL coefficient was 0, so its token rewards hold no KL: estimating it "
        "from the behaviour response_logprobs and ref_logprobs instead",
        stacklevel=4,
    )
    width = mask.shape[1]
    estimated = kl_penalty(
        padded(required(batch, "response_logprobs", lengths), width),
        padded(required(batch, "ref_logprobs", lengths), width),
        plan.kl_estimator,
    )
    if missing.all():
        return estimated
    stored = padded(column, width)
    return torch.where(torch.from_numpy(missing).unsqueeze(1), estimated, stored)
