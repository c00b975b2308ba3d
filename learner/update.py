"""The update stage of an iteration: `ppo_epochs` passes over the batch in random minibatches, one
optimizer step per minibatch (policy, and the separate critic), each accumulated over token-budget
micro-batches.

A step reads the device once: the losses and clip and KL figures summed over its micro-batches (on
the device), and the gradient norms, in one transfer after the backward passes; nothing in the
micro-batch loop waits for the device.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from learner import distributed as dist
from learner.advantages import masked_mean, masked_whiten
from learner.batch import to_device
from learner.evaluation import Evaluated
from learner.losses import policy_loss, value_loss
from learner.samples import SampleBatch

if TYPE_CHECKING:
    from learner.learner import Learner

# What each optimizer step sums over its micro-batches and ranks (the last five weighted by tokens).
STEP_FIGURES = (
    "policy_loss",
    "value_loss",
    "clip_frac",
    "clip_frac_high",
    "clip_frac_low",
    "approx_kl",
    "value_clip_frac",
)


def update(
    learner: Learner,
    batch: SampleBatch,
    ev: Evaluated,
    advantages: torch.Tensor,
    returns: torch.Tensor,
    kl: torch.Tensor,
) -> dict[str, float]:
    """Every optimizer step of the iteration on (N, T) advantages, returns and kl; the mean of each
    step's stats, with the batch's kl, entropy and behaviour-logprob figures."""
    lc = learner.cfg
    m = ev.mask
    trained = batch.trained_rows(lc.mask_truncated)
    if lc.whiten_advantages:  # over the samples the update uses: the others' advantages are not used
        advantages = masked_whiten(advantages, m * to_device(torch.from_numpy(trained), m.device)[:, None])
    log_ratio = torch.where(m.bool(), ev.old_logprobs - ev.behaviour_logprobs, 0)
    is_weights = None
    if lc.behaviour_is_cap is not None:
        is_weights = torch.exp(log_ratio).clamp(max=lc.behaviour_is_cap)  # w = min(π_prox / π_behaviour, cap)
    N = len(batch)
    rows = np.flatnonzero(trained)
    totals: dict[str, list[float]] = {}
    skipped = 0
    for epoch in range(lc.ppo_epochs):
        # The same order on every rank, and after a resume: seeded by (seed, version, epoch).
        generator = torch.Generator().manual_seed(learner.seed * 1_000_003 + learner.version * 101 + epoch)
        order = rows[torch.randperm(len(rows), generator=generator).numpy()]
        for start in range(0, len(rows), lc.minibatch_size):
            stats = _step(learner, batch, ev, advantages, returns, is_weights, order[start : start + lc.minibatch_size])
            if stats is None:
                skipped += 1
                continue
            for k, v in stats.items():
                totals.setdefault(k, []).append(v)
    figures = {
        "kl": (kl * m).sum(dim=1).mean(),
        "entropy": masked_mean(ev.entropy, m),
        # How far the engine's logprobs are from the learner's for the same tokens and weights
        # (or older weights, with staleness), and how much the IS cap cut.
        "behaviour_logprob_mismatch": masked_mean(log_ratio.abs(), m),
    }
    if is_weights is not None:
        figures["behaviour_is_clip_frac"] = masked_mean((log_ratio.exp() > lc.behaviour_is_cap).float(), m)
    read = dict(zip(figures, torch.stack(list(figures.values())).tolist()))  # one host sync
    learner.kl_controller.update(read["kl"], N)
    learner.version += 1
    out = {k: float(np.mean(v)) for k, v in totals.items()}
    out.update(skipped_steps=skipped, kl_coef=learner.kl_controller.coef, **read)
    out["trained_samples"] = int(len(rows))
    return out


def _step(
    learner: Learner,
    batch: SampleBatch,
    ev: Evaluated,
    advantages: torch.Tensor,
    returns: torch.Tensor,
    is_weights: torch.Tensor | None,
    rows: np.ndarray,
) -> dict[str, float] | None:
    """One optimizer step on the minibatch `rows`: this rank's share, in micro-batches. None when
    the step was skipped: its loss or gradient norm was not finite (the same on every rank)."""
    lc = learner.cfg
    lengths = batch.model_tokens[rows]  # an episode's environment tokens carry no loss
    n_tokens = max(1, int(lengths.sum()))
    denominator = n_tokens if lc.loss_agg_mode == "token_mean" else max(1, int((lengths > 0).sum()))
    learner.policy_opt.zero_grad(set_to_none=True)
    if learner.critic_opt is not None:
        learner.critic_opt.zero_grad(set_to_none=True)
    # Summed over micro-batches, on the device (read once per step): losses, already shares of the
    # minibatch, and the clip and KL figures weighted by each piece's tokens.
    sums = torch.zeros(len(STEP_FIGURES), dtype=torch.float64, device=learner.device)
    for micro in learner.plan(batch, rows)[learner.rank]:
        tokens = learner.collate(batch, micro.rows)
        index = to_device(torch.from_numpy(micro.rows), learner.device)
        T = tokens.mask.shape[1]
        keep = tokens.mask

        def old(x: torch.Tensor) -> torch.Tensor:
            return x[index, :T]

        with learner.compute():
            policy = learner.policy(tokens, learner.temperature, with_entropy=lc.entropy_coef > 0)
            values = learner.values(tokens, policy)
        pg_loss, pg_stats = policy_loss(
            policy.logprobs,
            old(ev.old_logprobs),
            old(advantages),
            keep,
            lc,
            denominator,
            None if is_weights is None else old(is_weights),
        )
        vf_loss, vf_stats = value_loss(values, old(ev.values), old(returns), keep, lc.value_clip, n_tokens)
        loss = pg_loss
        if policy.entropy is not None:
            loss = loss - lc.entropy_coef * torch.where(keep.bool(), policy.entropy, 0).sum() / n_tokens
        if not learner.critic_free:
            loss = loss + (lc.vf_coef if learner.critic is None else 1.0) * vf_loss
        weight = 0.0 if micro.filler else 1.0  # a filler only keeps the ranks' collectives in step
        # FSDP averages the ranks' gradients; each rank's loss is a share of the whole minibatch's.
        (weight * learner.world_size * loss).backward()
        learner.micro_batches_done += 1
        local_tokens = keep.sum()
        figures = {"policy_loss": pg_loss.detach(), "value_loss": vf_loss.detach()}
        figures.update({k: local_tokens * v for k, v in (*pg_stats.items(), *vf_stats.items())})
        sums += weight * torch.stack([figures[name].double() for name in STEP_FIGURES])
    norms = [_clip(learner.policy.parameters(), lc.max_grad_norm)]
    if learner.critic_opt is not None:
        norms.append(_clip(learner.critic.parameters(), lc.max_grad_norm))
    read = torch.cat([dist.all_reduce_sum(sums), torch.stack(norms).double()]).tolist()  # the step's one host sync
    summed = dict(zip(STEP_FIGURES, read))
    grad_norm, critic_norm = read[len(STEP_FIGURES)], (read[-1] if learner.critic_opt is not None else 0.0)
    checked = {
        "policy_loss": summed["policy_loss"],
        "value_loss": summed["value_loss"],
        "grad_norm": grad_norm,
        "critic_grad_norm": critic_norm,
    }
    if not learner.finite_steps.finite(checked):  # this step's gradients are dropped
        learner.policy_opt.zero_grad(set_to_none=True)
        if learner.critic_opt is not None:
            learner.critic_opt.zero_grad(set_to_none=True)
        return None
    learner.policy_opt.step()
    if learner.critic_opt is not None:
        learner.critic_opt.step()
    stats = {"policy_loss": summed["policy_loss"], "grad_norm": grad_norm}
    stats.update({name: summed[name] / n_tokens for name in ("clip_frac", "clip_frac_high", "clip_frac_low")})
    stats["approx_kl"] = summed["approx_kl"] / n_tokens
    if not learner.critic_free:
        stats.update(value_loss=summed["value_loss"], value_clip_frac=summed["value_clip_frac"] / n_tokens)
    return stats


def _clip(parameters, max_norm: float) -> torch.Tensor:
    """Clip the gradients to `max_norm`; their norm before, a 0-dim tensor left on the device."""
    norm = torch.nn.utils.clip_grad_norm_(list(parameters), max_norm)
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm
