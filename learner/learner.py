"""The PPO learner, one rank of it: trainable policy (and critic), frozen reference, optimisers.

One iteration is `learn(batch)` on a columnar `SampleBatch`, in three timed stages:
    evaluated = self.evaluate(batch)        # values: old logprobs, reference logprobs, values
    self.assign_advantages(...)             # advantages: KL-penalised token rewards, the estimator
    stats = self.update(...)                # update: ppo_epochs x minibatches x micro-batches
and returns `LearnerColumns`, the per-token results, with the stats and stage seconds.

With `learner.num_ranks` > 1 every rank runs `learn` on the same batch: the no-grad passes split the
rows between the ranks and gather the results, so every rank holds the whole batch's advantages;
each minibatch is split between the ranks too, and its losses are normalised by the whole
minibatch's counts, so the summed gradients equal one rank's. Policy, critic and reference are
FSDP2-sharded; master weights and optimizer state stay float32 whatever the compute dtype.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from contracts.config import LearnerConfig
from learner import checkpoint
from learner import distributed as dist
from learner.advantages import masked_mean, masked_whiten, token_rewards
from learner.batch import TokenBatch
from learner.checkpoint_writer import CheckpointWriter, PendingCheckpoint
from learner.estimators import estimate, estimator
from learner.evaluation import Evaluated, in_batch_order
from learner.finite_steps import FiniteSteps
from learner.kl_control import make_kl_controller
from learner.losses import policy_loss, value_loss
from learner.microbatch import plan
from learner.models import DTYPES, CriticModel, PolicyModel, load_causal_lm
from learner.samples import LearnerColumns, SampleBatch

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


class Learner:
    def __init__(
        self,
        cfg: LearnerConfig,
        model_path: str,
        *,
        dtype: str = "float32",
        temperature: float = 1.0,
        seed: int = 0,
        threads: int | None = None,
        rank: int = 0,
        world_size: int = 1,
        address: str | None = None,
    ):
        """`cfg` is the learner's section; besides it the learner needs the model it starts from, the
        compute `dtype`, the sampling `temperature` the engines draw at (its logprobs must be those of
        the same distribution; greedy decoding, 0, is scored at 1), the `seed` and, on CPU, its torch
        `threads` (None: torch's own choice)."""
        self.cfg = lc = cfg
        self.device = dist.local_device(lc.device)
        if world_size > 1:
            dist.init_process_group(rank, world_size, address, self.device)
        self.rank, self.world_size, self.seed = rank, world_size, seed
        if self.device.type == "cpu" and threads is not None:
            torch.set_num_threads(threads)
        torch.manual_seed(seed)
        self.compute_dtype = DTYPES[dtype]
        self.critic_free = not estimator(lc.estimator).needs_critic
        policy_lm = load_causal_lm(model_path, torch.float32)
        self.pad_id = policy_lm.config.pad_token_id or 0
        self.tied_head = bool(getattr(policy_lm.config, "tie_word_embeddings", False))
        # Training mode (transformers loads in eval mode): gradient checkpointing acts only in it.
        self.policy = self._place(PolicyModel(policy_lm, value_head=lc.shared_critic and not self.critic_free).train())
        self.critic = None
        if not (lc.shared_critic or self.critic_free):
            self.critic = self._place(CriticModel(model_path, torch.float32).train())
        reference = PolicyModel(load_causal_lm(model_path, self.compute_dtype)).eval().requires_grad_(False)
        self.reference = self._place(reference)
        if lc.gradient_checkpointing:
            for backbone in filter(None, (policy_lm, self.critic and self.critic.backbone)):
                backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.temperature = temperature or 1.0
        self.policy_opt = torch.optim.AdamW(self.policy.parameters(), lr=lc.lr)
        self.critic_opt = torch.optim.AdamW(self.critic.parameters(), lr=lc.critic_lr) if self.critic else None
        self.kl_controller = make_kl_controller(lc.kl.coef, lc.kl.target, lc.kl.horizon)
        self.version = 0
        self.finite_steps = FiniteSteps(lc.max_nonfinite_steps, lc.lr)
        self.micro_batches_done = 0  # forward passes so far: what the driver's stall watch sees advance
        self.checkpoint_group = dist.checkpoint_group() if world_size > 1 else None
        self.checkpoints = CheckpointWriter(self)

    def _place(self, module: torch.nn.Module) -> torch.nn.Module:
        module = module.to(self.device)
        return dist.shard(module, self.compute_dtype) if self.world_size > 1 else module

    def _compute(self):
        """One rank computes in the compute dtype by autocast; several by FSDP's mixed precision."""
        if self.world_size == 1 and self.compute_dtype != torch.float32:
            return torch.autocast(self.device.type, dtype=self.compute_dtype)
        return contextlib.nullcontext()

    def learn(self, batch: SampleBatch) -> tuple[LearnerColumns, dict[str, float], dict[str, float]]:
        """One PPO iteration on scored samples: (per-token columns, stats, stage seconds)."""
        timings = {}
        start = time.perf_counter()
        ev = self.evaluate(batch)
        timings["values"] = time.perf_counter() - start
        start = time.perf_counter()
        kl_coef = self.kl_controller.coef  # the update moves it
        rewards, kl, advantages, returns = self.assign_advantages(batch, ev)
        timings["advantages"] = time.perf_counter() - start
        start = time.perf_counter()
        stats = self.update(batch, ev, advantages, returns, kl)
        timings["update"] = time.perf_counter() - start
        columns = LearnerColumns(
            *(batch.flat(x) for x in (ev.old_logprobs, ev.ref_logprobs, ev.values, kl, rewards, advantages, returns)),
            kl_coef=kl_coef,
        )
        return columns, stats, timings

    # -- scoring ---------------------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self, batch: SampleBatch) -> Evaluated:
        """Old policy logprobs, reference logprobs, values and entropies of every response token."""
        rows = np.arange(len(batch))
        plans = plan(rows, batch.prompt_lengths, batch.response_lengths, self.cfg.micro_batch_tokens, self.world_size)
        mine, outputs = [], []
        for micro in plans[self.rank]:
            tokens = batch.collate(micro.rows, self.pad_id).to(self.device)
            with self._compute():
                policy = self.policy(tokens, self.temperature, with_entropy=True)
                ref = self.reference(tokens, self.temperature)
                values = self._values(tokens, policy)
            self.micro_batches_done += 1
            if micro.filler:
                continue
            keep = tokens.mask.bool()
            mine.append(micro.rows)
            outputs.append(
                torch.stack(
                    [policy.logprobs[keep], ref.logprobs[keep], values[keep], policy.entropy[keep]], dim=1
                ).cpu()
            )
        local = torch.cat(outputs) if outputs else torch.zeros((0, 4))
        flat = in_batch_order(batch, plans, local.to(self.device))
        columns = [batch.padded(flat[:, c]).to(self.device) for c in range(4)]
        mask = batch.padded(np.ones(len(batch.response_ids), dtype=np.float32)).to(self.device)
        return Evaluated(mask, *columns, batch.padded(batch.behaviour_logprobs).to(self.device))

    def assign_advantages(self, batch: SampleBatch, ev: Evaluated):
        """(token rewards, kl, advantages, returns), each (N, T), by `learner.estimator`."""
        lc = self.cfg
        scores = torch.tensor(batch.scores, dtype=torch.float32, device=self.device)
        rewards, kl = token_rewards(
            scores, ev.old_logprobs, ev.ref_logprobs, ev.mask, self.kl_controller.coef, lc.kl.estimator
        )
        groups = torch.tensor(batch.groups, device=self.device)
        advantages, returns = estimate(rewards, ev.values, ev.mask, groups, lc)
        return rewards, kl, advantages, returns

    # -- learning --------------------------------------------------------------------------------

    def update(
        self, batch: SampleBatch, ev: Evaluated, advantages: torch.Tensor, returns: torch.Tensor, kl: torch.Tensor
    ) -> dict[str, float]:
        lc = self.cfg
        m = ev.mask
        if lc.whiten_advantages:
            advantages = masked_whiten(advantages, m)
        log_ratio = torch.where(m.bool(), ev.old_logprobs - ev.behaviour_logprobs, 0)
        is_weights = None
        if lc.behaviour_is_cap is not None:
            is_weights = torch.exp(log_ratio).clamp(max=lc.behaviour_is_cap)  # w = min(π_prox / π_behaviour, cap)
        N = len(batch)
        totals: dict[str, list[float]] = {}
        skipped = 0
        for epoch in range(lc.ppo_epochs):
            # The same order on every rank, and after a resume: seeded by (seed, version, epoch).
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.version * 101 + epoch)
            order = torch.randperm(N, generator=generator).numpy()
            for start in range(0, N, lc.minibatch_size):
                stats = self._step(batch, ev, advantages, returns, is_weights, order[start : start + lc.minibatch_size])
                if stats is None:
                    skipped += 1
                    continue
                for k, v in stats.items():
                    totals.setdefault(k, []).append(v)
        seq_kl = (kl * m).sum(dim=1).mean().item()
        self.kl_controller.update(seq_kl, N)
        self.version += 1
        out = {k: float(np.mean(v)) for k, v in totals.items()}
        out["skipped_steps"] = skipped
        out.update(
            {
                "kl": seq_kl,
                "kl_coef": self.kl_controller.coef,
                "entropy": masked_mean(ev.entropy, m).item(),
                # How far the engine's logprobs are from the learner's for the same tokens and weights
                # (or older weights, with staleness), and how much the IS cap cut.
                "behaviour_logprob_mismatch": masked_mean(log_ratio.abs(), m).item(),
            }
        )
        if is_weights is not None:
            out["behaviour_is_clip_frac"] = masked_mean((log_ratio.exp() > lc.behaviour_is_cap).float(), m).item()
        return out

    def _step(
        self,
        batch: SampleBatch,
        ev: Evaluated,
        advantages: torch.Tensor,
        returns: torch.Tensor,
        is_weights: torch.Tensor | None,
        rows: np.ndarray,
    ) -> dict[str, float] | None:
        """One optimizer step on the minibatch `rows`: this rank's share, in micro-batches. None when
        the step was skipped: its loss or gradient norm was not finite (the same on every rank)."""
        lc = self.cfg
        lengths = batch.response_lengths[rows]
        n_tokens = max(1, int(lengths.sum()))
        denominator = n_tokens if lc.loss_agg_mode == "token_mean" else max(1, int((lengths > 0).sum()))
        self.policy_opt.zero_grad(set_to_none=True)
        if self.critic_opt is not None:
            self.critic_opt.zero_grad(set_to_none=True)
        # Summed over micro-batches, on the device (read once per step): losses, already shares of the
        # minibatch, and the clip and KL figures weighted by each piece's tokens.
        sums = torch.zeros(len(STEP_FIGURES), dtype=torch.float64, device=self.device)
        for micro in plan(rows, batch.prompt_lengths, batch.response_lengths, lc.micro_batch_tokens, self.world_size)[
            self.rank
        ]:
            tokens = batch.collate(micro.rows, self.pad_id).to(self.device)
            index = torch.from_numpy(micro.rows).to(self.device)
            T = tokens.mask.shape[1]
            keep = tokens.mask

            def old(x: torch.Tensor) -> torch.Tensor:
                return x[index, :T]

            with self._compute():
                policy = self.policy(tokens, self.temperature, with_entropy=lc.entropy_coef > 0)
                values = self._values(tokens, policy)
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
            if not self.critic_free:
                loss = loss + (lc.vf_coef if self.critic is None else 1.0) * vf_loss
            weight = 0.0 if micro.filler else 1.0  # a filler only keeps the ranks' collectives in step
            # FSDP averages the ranks' gradients; each rank's loss is a share of the whole minibatch's.
            (weight * self.world_size * loss).backward()
            self.micro_batches_done += 1
            local_tokens = keep.sum()
            figures = {"policy_loss": pg_loss.detach(), "value_loss": vf_loss.detach()}
            figures.update({k: local_tokens * v for k, v in (*pg_stats.items(), *vf_stats.items())})
            sums += weight * torch.stack([figures[name].double() for name in STEP_FIGURES])
        summed = dict(zip(STEP_FIGURES, dist.all_reduce_sum(sums).tolist()))
        grad_norm = _clip(self.policy.parameters(), lc.max_grad_norm)
        critic_norm = _clip(self.critic.parameters(), lc.max_grad_norm) if self.critic_opt is not None else 0.0
        checked = {
            "policy_loss": summed["policy_loss"],
            "value_loss": summed["value_loss"],
            "grad_norm": grad_norm,
            "critic_grad_norm": critic_norm,
        }
        if not self.finite_steps.finite(checked):  # this step's gradients are dropped
            self.policy_opt.zero_grad(set_to_none=True)
            if self.critic_opt is not None:
                self.critic_opt.zero_grad(set_to_none=True)
            return None
        self.policy_opt.step()
        if self.critic_opt is not None:
            self.critic_opt.step()
        stats = {"policy_loss": summed["policy_loss"], "grad_norm": grad_norm}
        stats.update({name: summed[name] / n_tokens for name in ("clip_frac", "clip_frac_high", "clip_frac_low")})
        stats["approx_kl"] = summed["approx_kl"] / n_tokens
        if not self.critic_free:
            stats.update(value_loss=summed["value_loss"], value_clip_frac=summed["value_clip_frac"] / n_tokens)
        return stats

    def _values(self, tokens, policy) -> torch.Tensor:
        if self.critic is not None:
            return self.critic(tokens)
        if policy.values is not None:
            return policy.values
        return torch.zeros_like(policy.logprobs)  # critic-free estimators: no baseline from a critic

    # -- weights and checkpoints -----------------------------------------------------------------

    def named_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        """The policy's weights with Hugging Face names, one whole tensor at a time, on this rank's device in
        the learner's own dtype (callers cast as they copy). A sharded one is gathered as it comes: a
        collective, so every rank iterates, in the same order; the extra memory is one tensor."""
        for name, tensor in self.policy.state_dict().items():
            if name.startswith("lm."):
                whole = tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor
                yield name.removeprefix("lm."), whole.detach()

    def export_weights(self) -> list[tuple[str, torch.Tensor]] | None:
        """Policy weights with Hugging Face names on CPU in the compute dtype, for the object store and the
        checkpoint's loadable policy: cast on the device, then copied once (into pinned memory on cuda); the
        full set on rank 0 (every rank must call this), None on the others."""
        cuda = self.device.type == "cuda"
        out = []
        for name, tensor in self.named_weights():
            if self.rank == 0:
                cast = tensor.to(self.compute_dtype)
                host = torch.empty(cast.shape, dtype=cast.dtype, pin_memory=cuda)
                out.append((name, host.copy_(cast, non_blocking=cuda)))
        if cuda:
            torch.cuda.synchronize(self.device)
        return out if self.rank == 0 else None

    def save(self, directory: Path, extra: dict) -> None:
        """Every rank: write its part of checkpoint `directory` and wait for it (learner/checkpoint.py)."""
        self.checkpoints.save_async(directory, extra).wait()
        dist.barrier()

    def save_async(self, directory: Path, extra: dict) -> PendingCheckpoint:
        """Every rank: stage its part of checkpoint `directory` and write it in the background."""
        return self.checkpoints.save_async(directory, extra)

    def load(self, directory: Path) -> dict:
        """Restore from `save` (with any number of ranks); returns its `extra` (job state such as the data cursor)."""
        return checkpoint.load(self, directory)

    def weights_finite(self) -> bool:
        """Every trainable weight finite, on every rank (a collective when sharded)."""
        bad = torch.zeros(1, dtype=torch.float64, device=self.device)
        for module in filter(None, (self.policy, self.critic)):
            for p in module.parameters():
                local = p.detach().to_local() if hasattr(p, "to_local") else p.detach()
                bad += (~torch.isfinite(local)).sum()
        return dist.all_reduce_sum(bad).item() == 0

    def probe_logprobs(self, token_ids: list[int]) -> list[float]:
        """log p(token_ids[t] | token_ids[:t]) for t >= 1 under the policy, at temperature 1 (every
        rank: the forward is a collective when sharded); the engines' must match after a sync."""
        ids = torch.tensor([token_ids], device=self.device)
        probe = TokenBatch(
            ids,
            torch.ones_like(ids),
            torch.arange(len(token_ids), device=self.device)[None],
            ids[:, 1:],
            torch.ones_like(ids[:, 1:], dtype=torch.float32),
            prompt_width=1,
        )
        with torch.no_grad(), self._compute():
            return self.policy(probe, temperature=1.0).logprobs[0].float().tolist()

    def versioned_weights(self) -> tuple[int, list[tuple[str, torch.Tensor]] | None]:
        """(version, weights) read together, for an engine restarted between collective syncs."""
        return self.version, self.export_weights()


def _clip(parameters, max_norm: float) -> float:
    norm = torch.nn.utils.clip_grad_norm_(list(parameters), max_norm)
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
