"""The PPO learner, one rank of it: trainable policy (and critic), frozen reference, optimisers.

One iteration is `learn(batch)` on a columnar `SampleBatch`, in three timed stages, each a method below:
    evaluated = self.evaluate(batch)        # values: old logprobs, reference logprobs, values (no grad)
    self.assign_advantages(...)             # advantages: KL-penalised token rewards, the estimator
    stats = self.update(...)                # update: ppo_epochs x minibatches x micro-batches
and returns `LearnerColumns`, the per-token results, with the stats and stage seconds. Each stage
runs in micro-batches of the token budget, padded or packed into one row (`learner.pack_sequences`,
with an attention that keeps within each sequence: packed_attention.py). The math of each stage is
small pure functions on (batch, time) tensors in their own modules (advantages.py, estimators.py,
losses.py).

What trains is `self.trained`: the policy and, with a separate critic, the critic, each with its own
optimizer (`Trained`); the update zeroes, clips, steps and checkpoints every entry alike.

With `learner.num_ranks` > 1 every rank runs `learn` on the same batch: the no-grad passes split the
rows between the ranks and gather the results, so every rank holds the whole batch's advantages;
each minibatch is split between the ranks too, and its losses are normalised by the whole
minibatch's counts, so the summed gradients equal one rank's. Policy, critic and reference are
FSDP2-sharded; master weights and optimizer state stay float32 whatever the compute dtype.

With `learner.lora.rank` the policy trains low-rank adapters on its frozen base (learner/lora.py): only
they are in the optimizer and the checkpoint's training state, the reference is the policy with its
adapters off (no reference module), and the exported weights are merged.

The update reads the device once per optimizer step: the losses and clip and KL figures summed over
its micro-batches (on the device), and the gradient norms, in one transfer after the backward passes;
nothing in a micro-batch loop waits for the device, so on a GPU the host lays out the next micro-batch
while the last one runs.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from contracts.config import LearnerConfig
from contracts.device import fused_adamw
from learner import checkpoint, lora, packed_attention
from learner import distributed as dist
from learner.advantages import masked_mean, masked_whiten, token_rewards
from learner.batch import TokenBatch, to_device
from learner.checkpoint import NonFiniteError
from learner.checkpoint_writer import CheckpointWriter, PendingCheckpoint
from learner.distill import distill_rewards, load_teacher
from learner.estimators import estimate, estimator
from learner.evaluation import Evaluated, in_batch_order
from learner.finite_steps import FiniteSteps
from learner.kl_control import make_kl_controller
from learner.losses import loss_denominator, mismatch, policy_loss, rollout_correction, value_loss
from learner.microbatch import MicroBatch, plan
from learner.models import DTYPES, CriticModel, PolicyModel, PolicyOutput, Trained, load_causal_lm
from learner.samples import LearnerColumns, SampleBatch, single_sequence

# What each optimizer step sums over its micro-batches and ranks (the last five weighted by tokens).
STEP_FIGURES = (
    "policy_loss",
    "value_loss",
    "clip_frac",
    "clip_frac_high",
    "clip_frac_low",
    "approx_kl",
    "value_clip_frac",
    "clipped_sequences",
)
# What the metrics call the share of tokens or sequences each rollout correction capped or masked.
CORRECTION_STATS = {
    "token_tis": "capped_tokens",
    "sequence_tis": "capped_sequences",
    "token_mask": "masked_tokens",
    "sequence_mask": "masked_sequences",
}
# What each trained network's gradient norm is called in the stats and the non-finite check.
GRAD_NORM_STATS = {"policy": "grad_norm", "critic": "critic_grad_norm"}


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
        teacher_path: str | None = None,
    ):
        """`cfg` is the learner's section; besides it the learner needs the model it starts from, the
        compute `dtype`, the sampling `temperature` the engines draw at (its logprobs must be those of
        the same distribution; greedy decoding, 0, is scored at 1), the `seed` and, on CPU, its torch
        `threads` (None: torch's own choice), and with `learner.teacher` the teacher's model directory."""
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
        # Packed micro-batches need an attention that stays within each sequence; None: padded ones.
        packed_with = packed_attention.choose(self.device.type, self.compute_dtype) if lc.pack_sequences else None
        self.packed = packed_with is not None
        attention = packed_with or "sdpa"
        policy_lm = load_causal_lm(model_path, torch.float32, attention)
        self.pad_id = policy_lm.config.pad_token_id or 0
        self.tied_head = bool(getattr(policy_lm.config, "tie_word_embeddings", False))
        # LoRA: adapters injected into the LM in place (a frozen base), before sharding.
        self.lora = lora.Adapters(policy_lm, lc.lora, "CAUSAL_LM") if lc.lora.rank is not None else None
        # Training mode (transformers loads in eval mode): gradient checkpointing acts only in it.
        self.policy = self._place(PolicyModel(policy_lm, value_head=lc.shared_critic and not self.critic_free).train())
        self.exports = lora.exports(self.policy) if self.lora else None
        self.critic = None
        if not (lc.shared_critic or self.critic_free):
            critic = CriticModel(model_path, torch.float32, attention)
            if self.lora and lc.lora.critic == "lora":
                lora.Adapters(critic.backbone, lc.lora, "FEATURE_EXTRACTION")
            self.critic = self._place(critic.train())
        self.reference = None  # under LoRA the policy with its adapters off: no second copy
        if self.lora is None:
            reference = PolicyModel(load_causal_lm(model_path, self.compute_dtype, attention))
            self.reference = self._place(reference.eval().requires_grad_(False))
        self.teacher = None  # learner.teacher: frozen, in the compute dtype, sharded as the reference is
        if teacher_path is not None:
            teacher = load_teacher(teacher_path, policy_lm, self.compute_dtype, attention)
            self.teacher = self._place(teacher.eval().requires_grad_(False))
        if lc.gradient_checkpointing:
            for backbone in filter(None, (policy_lm, self.critic and self.critic.backbone)):
                backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.temperature = temperature or 1.0
        # A shared value head trains with the policy's loss, weighed by vf_coef; a separate critic has
        # its own optimizer, so its loss is taken whole.
        self.value_coef = lc.vf_coef if self.critic is None else 1.0
        fused = fused_adamw(self.device.type)
        # Only what trains: everything without LoRA, the adapters (and a value head) with it.
        self.trained = [
            Trained("policy", self.policy, torch.optim.AdamW(lora.trainable(self.policy), lr=lc.lr, fused=fused))
        ]
        if self.critic is not None:
            critic_opt = torch.optim.AdamW(lora.trainable(self.critic), lr=lc.critic_lr, fused=fused)
            self.trained.append(Trained("critic", self.critic, critic_opt))
        self.kl_controller = make_kl_controller(lc.kl.coef, lc.kl.target, lc.kl.horizon)
        self.version = 0
        self.finite_steps = FiniteSteps(lc.max_nonfinite_steps, lc.lr)
        self.micro_batches_done = 0  # forward passes so far: what the driver's stall watch sees advance
        checkpoint_group = dist.checkpoint_group() if world_size > 1 else None
        self.distill_stats: dict[str, float] = {}  # this iteration's distill/ figures (learner.teacher)
        self.checkpoints = CheckpointWriter(rank, world_size, checkpoint_group, cuda=self.device.type == "cuda")

    def _place(self, module: torch.nn.Module) -> torch.nn.Module:
        module = module.to(self.device)
        return dist.shard(module, self.compute_dtype) if self.world_size > 1 else module

    def compute(self):
        """One rank computes in the compute dtype by autocast; several by FSDP's mixed precision."""
        if self.world_size == 1 and self.compute_dtype != torch.float32:
            return torch.autocast(self.device.type, dtype=self.compute_dtype)
        return contextlib.nullcontext()

    def plan(self, batch: SampleBatch, rows: np.ndarray) -> list[list[MicroBatch]]:
        """Every rank's micro-batches over `rows` of `batch` (learner/microbatch.py)."""
        lengths = (batch.prompt_lengths, batch.response_lengths)
        return plan(rows, *lengths, self.cfg.micro_batch_tokens, self.world_size, packed=self.packed)

    def collate(self, batch: SampleBatch, rows: np.ndarray) -> TokenBatch:
        """One micro-batch, padded or packed as this learner runs them, on its device."""
        return batch.collate(rows, self.pad_id, packed=self.packed).to(self.device)

    def learn(self, batch: SampleBatch) -> tuple[LearnerColumns, dict[str, float], dict[str, float]]:
        """One PPO iteration on scored samples: (per-token columns, stats, stage seconds)."""
        timings = {}
        start = time.perf_counter()
        ev = self.evaluate(batch)
        timings["values"] = self._since(start)
        start = time.perf_counter()
        kl_coef = self.kl_controller.coef  # the update moves it
        rewards, kl, advantages, returns = self.assign_advantages(batch, ev)
        timings["advantages"] = self._since(start)
        start = time.perf_counter()
        stats = self.update(batch, ev, advantages, returns, kl)
        stats.update(self.distill_stats)
        timings["update"] = self._since(start)
        columns = LearnerColumns(
            *(batch.flat(x) for x in (ev.old_logprobs, ev.ref_logprobs, ev.values, kl, rewards, advantages, returns)),
            kl_coef=kl_coef,
            trained=batch.trained_rows(self.cfg.mask_truncated),
        )
        return columns, stats, timings

    def _since(self, start: float) -> float:
        """Seconds since `start` of the stage's work, not of its queueing: the passes never wait for
        the GPU, so a stage's end waits for it once."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter() - start

    # -- values: the no-grad passes ----------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self, batch: SampleBatch) -> Evaluated:
        """Old policy logprobs, reference logprobs, values and entropies of every response token: the three
        forward passes (policy, reference, critic unless shared; the teacher's with learner.teacher) of every micro-batch of this rank's share
        of the rows, gathered from every rank. Under LoRA the reference pass is the policy's with its
        adapters off, and no pass has dropout (`scoring`)."""
        plans = self.plan(batch, np.arange(len(batch)))
        # With the engine's logprobs as the old ones, the policy's pass is needed only for a shared value head.
        policy_pass = self.cfg.old_logprobs == "recompute" or self.policy.value_head is not None
        outputs = []
        with self.scoring():
            for micro in plans[self.rank]:
                tokens = self.collate(batch, micro.rows)
                with self.compute():
                    policy = self.policy(tokens, self.temperature, with_entropy=True) if policy_pass else None
                    ref = self.reference_pass(tokens)
                    teacher = self.teacher(tokens, self.temperature) if self.teacher is not None else None
                    values = self.values(tokens, policy or ref)  # the reference's output has no value head
                self.micro_batches_done += 1
                if not micro.filler:
                    columns = (ref.logprobs, values)
                    if policy is not None:
                        columns += (policy.logprobs, policy.entropy)
                    if teacher is not None:
                        columns += (teacher.logprobs,)
                    outputs.append(torch.stack([tokens.gather(c) for c in columns], dim=1))
        width = (4 if policy_pass else 2) + (self.teacher is not None)
        local = torch.cat(outputs) if outputs else torch.zeros((0, width), device=self.device)
        flat = in_batch_order(batch, plans, local)
        mask = to_device(batch.padded(batch.loss_mask), self.device)  # an episode's environment tokens are 0
        ref, values, *policy_columns = (batch.padded(flat[:, c]) * mask for c in range(width))
        teacher_logprobs = policy_columns.pop() if self.teacher is not None else None
        behaviour = to_device(batch.padded(batch.behaviour_logprobs), self.device) * mask
        old, entropy = policy_columns if policy_columns else (behaviour, None)
        return Evaluated(mask, old, ref, values, entropy, behaviour, teacher_logprobs)

    def reference_pass(self, tokens: TokenBatch) -> PolicyOutput:
        """The reference's outputs on `tokens` (in a no-grad pass): the frozen copy's, or under LoRA the
        policy's with its adapters off."""
        if self.lora is None:
            return self.reference(tokens, self.temperature)
        with self.lora.off():
            return self.policy(tokens, self.temperature)

    def values(self, tokens: TokenBatch, policy: PolicyOutput) -> torch.Tensor:
        """(B, T) values: the separate critic's, the shared head's, or zeros without a critic."""
        if self.critic is not None:
            return self.critic(tokens)
        if policy.values is not None:
            return policy.values
        return torch.zeros_like(policy.logprobs)

    def scoring(self) -> contextlib.ExitStack:
        """The context of the no-grad passes: under LoRA, policy and critic without dropout (the model
        the engines serve); nothing changes without it."""
        stack = contextlib.ExitStack()
        if self.lora is not None:
            for trained in self.trained:
                stack.enter_context(lora.no_dropout(trained.model))
        return stack

    # -- advantages ----------------------------------------------------------------------------------

    def assign_advantages(self, batch: SampleBatch, ev: Evaluated):
        """(token rewards, kl, advantages, returns), each (N, T), by `learner.estimator`."""
        lc = self.cfg
        scores = torch.tensor(batch.scores, dtype=torch.float32, device=self.device)
        turns = None if batch.turn_rewards is None else batch.padded(batch.turn_rewards).to(self.device)
        rewards, kl = token_rewards(
            scores, ev.old_logprobs, ev.ref_logprobs, ev.mask, self.kl_controller.coef, lc.kl.estimator, turns
        )
        if ev.teacher_logprobs is not None:  # on-policy distillation: learner/distill.py
            distilled, reverse_kl = distill_rewards(ev.old_logprobs, ev.teacher_logprobs, ev.mask, lc.teacher.coef)
            rewards = rewards + distilled
            self.distill_stats = {"distill/reverse_kl": masked_mean(reverse_kl, ev.mask).item()}
        groups = torch.tensor(batch.groups, device=self.device)
        advantages, returns = estimate(rewards, ev.values, ev.mask, groups, lc)
        return rewards, kl, advantages, returns

    # -- update: ppo_epochs x minibatches x micro-batches ------------------------------------------

    def update(
        self, batch: SampleBatch, ev: Evaluated, advantages: torch.Tensor, returns: torch.Tensor, kl: torch.Tensor
    ) -> dict[str, float]:
        """`ppo_epochs` passes over the batch's trained rows in random minibatches, one optimizer step per
        minibatch (`step`), on (N, T) advantages, returns and kl; then the KL controller and the policy
        version move. The mean of each step's stats, with the batch's kl, entropy and behaviour-logprob
        figures."""
        lc = self.cfg
        m = ev.mask
        trained = batch.trained_rows(lc.mask_truncated)
        if lc.whiten_advantages:  # over the samples the update uses: the others' advantages are not used
            advantages = masked_whiten(advantages, m * to_device(torch.from_numpy(trained), m.device)[:, None])
        log_ratio = torch.where(m.bool(), ev.old_logprobs - ev.behaviour_logprobs, 0)
        rc = lc.rollout_correction
        is_weights, corrected = rollout_correction(log_ratio, m.bool(), rc.mode, rc.lower_bound, rc.upper)
        rows = np.flatnonzero(trained)
        totals: dict[str, list[float]] = {}
        skipped = 0
        for epoch in range(lc.ppo_epochs):
            # The same order on every rank, and after a resume: seeded by (seed, version, epoch).
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.version * 101 + epoch)
            order = rows[torch.randperm(len(rows), generator=generator).numpy()]
            for start in range(0, len(rows), lc.minibatch_size):
                stats = self.step(batch, ev, advantages, returns, is_weights, order[start : start + lc.minibatch_size])
                if stats is None:
                    skipped += 1
                    continue
                for k, v in stats.items():
                    totals.setdefault(k, []).append(v)
        figures = {
            "kl": (kl * m).sum(dim=1).mean(),
            # How far the engine's logprobs are from the learner's for the same tokens and weights
            # (or older weights, with staleness), and how much the IS cap cut.
            "behaviour_logprob_mismatch": masked_mean(log_ratio.abs(), m),
        }
        if ev.entropy is not None:
            figures["entropy"] = masked_mean(ev.entropy, m)
        if rc.mode in CORRECTION_STATS:
            by_sequence = rc.mode.startswith("sequence")
            share = (
                masked_mean(corrected.any(-1).float(), m.any(-1)) if by_sequence else masked_mean(corrected.float(), m)
            )
            figures[f"rollout_correction/{CORRECTION_STATS[rc.mode]}"] = share
        # The engine's numerics against the learner's, over the samples drawn with the weights the learner holds.
        current = m.bool() & to_device(torch.from_numpy(batch.current_rows(self.version)), m.device)[:, None]
        figures.update({f"mismatch/{k}": v for k, v in mismatch(log_ratio, current).items()})
        read = dict(zip(figures, torch.stack(list(figures.values())).tolist()))  # one host sync
        if not read.pop("mismatch/tokens"):  # no sample of the current weights: nothing was measured
            read = {k: v for k, v in read.items() if not k.startswith("mismatch/")}
        self.kl_controller.update(read["kl"], len(batch))
        self.version += 1
        out = {k: float(np.mean(v)) for k, v in totals.items()}
        out.update(skipped_steps=skipped, kl_coef=self.kl_controller.coef, **read)
        out["trained_samples"] = int(len(rows))
        return out

    def step(
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
        lengths = batch.model_tokens[rows]  # an episode's environment tokens carry no loss
        n_tokens = max(1, int(lengths.sum()))
        denominator = max(1, int(loss_denominator(lc.loss_agg_mode, lengths)))  # tokens or sequences
        for trained in self.trained:
            trained.optimizer.zero_grad(set_to_none=True)
        # Summed over micro-batches, on the device (read once per step): losses, already shares of the
        # minibatch, and the clip and KL figures weighted by each piece's tokens.
        sums = torch.zeros(len(STEP_FIGURES), dtype=torch.float64, device=self.device)
        for micro in self.plan(batch, rows)[self.rank]:
            tokens = self.collate(batch, micro.rows)
            index = to_device(torch.from_numpy(micro.rows), self.device)
            T = tokens.mask.shape[1]
            keep = tokens.mask

            def old(x: torch.Tensor) -> torch.Tensor:
                return x[index, :T]

            with self.compute():
                policy = self.policy(tokens, self.temperature, with_entropy=lc.entropy_coef > 0)
                values = self.values(tokens, policy)
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
                loss = loss + self.value_coef * vf_loss
            weight = 0.0 if micro.filler else 1.0  # a filler only keeps the ranks' collectives in step
            # FSDP averages the ranks' gradients; each rank's loss is a share of the whole minibatch's.
            (weight * self.world_size * loss).backward()
            self.micro_batches_done += 1
            local_tokens = keep.sum()
            figures = {"policy_loss": pg_loss.detach(), "value_loss": vf_loss.detach()}
            counts = {"clipped_sequences": pg_stats.pop("clipped_sequences")}  # summed as they are
            figures.update({k: local_tokens * v for k, v in (*pg_stats.items(), *vf_stats.items())}, **counts)
            sums += weight * torch.stack([figures[name].double() for name in STEP_FIGURES])
        norms = torch.stack([clip_gradients(t.model.parameters(), lc.max_grad_norm) for t in self.trained])
        read = torch.cat([dist.all_reduce_sum(sums), norms.double()]).tolist()  # the step's one host sync
        summed = dict(zip(STEP_FIGURES, read))
        grad_norms = {GRAD_NORM_STATS[t.name]: norm for t, norm in zip(self.trained, read[len(STEP_FIGURES) :])}
        checked = {"policy_loss": summed["policy_loss"], "value_loss": summed["value_loss"], **grad_norms}
        if not self.finite_steps.finite(checked):
            for trained in self.trained:  # this step's gradients are dropped
                trained.optimizer.zero_grad(set_to_none=True)
            return None
        for trained in self.trained:
            trained.optimizer.step()
        stats = {"policy_loss": summed["policy_loss"], "grad_norm": grad_norms["grad_norm"]}
        stats.update({name: summed[name] / n_tokens for name in ("clip_frac", "clip_frac_high", "clip_frac_low")})
        stats["clipped_sequences"] = summed["clipped_sequences"] / max(1, int((lengths > 0).sum()))
        stats["approx_kl"] = summed["approx_kl"] / n_tokens
        if not self.critic_free:
            stats.update(value_loss=summed["value_loss"], value_clip_frac=summed["value_clip_frac"] / n_tokens)
        return stats

    # -- weights -----------------------------------------------------------------------------------

    def named_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        """The policy's weights with Hugging Face names, one whole tensor at a time, on this rank's device in
        the learner's own dtype (callers cast as they copy). A sharded one is gathered as it comes: a
        collective, so every rank iterates, in the same order; the extra memory is one tensor (under LoRA,
        the merged W + B·A·alpha/r of each adapted layer: learner/lora.py)."""
        return lora.merged_weights(self.policy, self.exports)

    def weight_shapes(self) -> list[tuple[str, tuple[int, ...]]]:
        """(Hugging Face name, shape) of each tensor `named_weights` yields, in its order; no collective."""
        return lora.weight_shapes(self.policy, self.exports)

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

    def versioned_weights(self) -> tuple[int, list[tuple[str, torch.Tensor]] | None]:
        """(version, weights) read together, for an engine restarted between collective syncs."""
        return self.version, self.export_weights()

    def weights_finite(self) -> bool:
        """Every trainable weight finite, on every rank (a collective when sharded)."""
        local = [
            p.detach().to_local() if hasattr(p, "to_local") else p.detach()
            for trained in self.trained
            for p in trained.model.parameters()
        ]
        # Each tensor's largest |w| (inf or NaN where any weight is one, and never an overflow): on CPU 7x faster
        # than counting isfinite's falses, and one host sync for all of them.
        largest = [t.abs().amax().float() for t in local if t.numel()]
        bad = (~torch.isfinite(torch.stack(largest))).any().to(torch.float64).reshape(1)
        return dist.all_reduce_sum(bad).item() == 0

    def probe_logprobs(self, token_ids: list[int]) -> list[float]:
        """log p(token_ids[t] | token_ids[:t]) for t >= 1 under the policy, at temperature 1 (every
        rank: the forward is a collective when sharded); the engines' must match after a sync."""
        one = single_sequence(token_ids)
        with torch.no_grad(), self.compute(), self.scoring():
            logprobs = self.policy(self.collate(one, np.zeros(1)), temperature=1.0).logprobs
        return logprobs[0, : len(token_ids) - 1].tolist()

    # -- checkpoints (their layout: learner/checkpoint.py; the background write: checkpoint_writer.py) --

    def save(self, directory: Path, extra: dict) -> None:
        """Every rank: write its part of checkpoint `directory` and wait for it."""
        self.save_async(directory, extra).wait()
        dist.barrier()

    def save_async(self, directory: Path, extra: dict) -> PendingCheckpoint:
        """Every rank: stage its part of checkpoint `directory` (the trained networks and their optimizers,
        the policy as a loadable model, and `extra`, the job's state such as the data cursor) and write it
        in the background. NonFiniteError, writing nothing, when a weight is inf or NaN."""
        directory = Path(directory)
        if not self.weights_finite():
            raise NonFiniteError(f"not writing checkpoint {directory.name}: the learner's weights hold inf or NaN")
        state = {  # learner.pt, written by rank 0
            "kl_controller": self.kl_controller.state_dict(),
            "version": self.version,
            "extra": extra,
            "lora": lora.settings(self.cfg.lora),  # what its adapters need to load (None: full fine-tuning)
        }
        return self.checkpoints.save_async(
            directory, self.trained, state, self.export_weights, self.policy.lm, self.tied_head
        )

    def load(self, directory: Path) -> dict:
        """Restore from `save` (with any number of ranks); returns its `extra`."""
        state = checkpoint.load_state_file(directory, lora.settings(self.cfg.lora))
        # The training state holds only trainable weights: the frozen ones (a LoRA base) are already the model's.
        checkpoint.load_training_state(self.trained, directory, strict=self.lora is None, no_dist=self.world_size == 1)
        self.kl_controller.load_state_dict(state["kl_controller"])
        self.version = state["version"]
        return state["extra"]


def clip_gradients(parameters, max_norm: float) -> torch.Tensor:
    """Clip the gradients to `max_norm`; their norm before, a 0-dim tensor left on the device."""
    norm = torch.nn.utils.clip_grad_norm_(list(parameters), max_norm)
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm
