"""The PPO learner, one rank of it: trainable policy (and critic), frozen reference, optimisers.

One iteration is `learn(batch)` on a columnar `SampleBatch`, in three timed stages:
    evaluated = self.evaluate(batch)        # values: old logprobs, reference logprobs, values (evaluation.py)
    self.assign_advantages(...)             # advantages: KL-penalised token rewards, the estimator
    stats = self.update(...)                # update: ppo_epochs x minibatches x micro-batches (update.py)
and returns `LearnerColumns`, the per-token results, with the stats and stage seconds. Each stage
runs in micro-batches of the token budget, padded or packed into one row (`learner.pack_sequences`,
with an attention that keeps within each sequence: packed_attention.py).

With `learner.num_ranks` > 1 every rank runs `learn` on the same batch: the no-grad passes split the
rows between the ranks and gather the results, so every rank holds the whole batch's advantages;
each minibatch is split between the ranks too, and its losses are normalised by the whole
minibatch's counts, so the summed gradients equal one rank's. Policy, critic and reference are
FSDP2-sharded; master weights and optimizer state stay float32 whatever the compute dtype.

With `learner.lora.rank` the policy trains low-rank adapters on its frozen base (learner/lora.py): only
they are in the optimizer and the checkpoint's training state, the reference is the policy with its
adapters off (no reference module), and the exported weights are merged.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from contracts.config import LearnerConfig
from learner import checkpoint, evaluation, lora, packed_attention, update
from learner import distributed as dist
from learner.advantages import token_rewards
from learner.batch import TokenBatch
from learner.checkpoint_writer import CheckpointWriter, PendingCheckpoint
from learner.estimators import estimate, estimator
from learner.evaluation import Evaluated
from learner.finite_steps import FiniteSteps
from learner.kl_control import make_kl_controller
from learner.microbatch import MicroBatch, plan
from learner.models import DTYPES, CriticModel, PolicyModel, PolicyOutput, load_causal_lm
from learner.samples import LearnerColumns, SampleBatch, single_sequence


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
        if lc.gradient_checkpointing:
            for backbone in filter(None, (policy_lm, self.critic and self.critic.backbone)):
                backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.temperature = temperature or 1.0
        fused = self.device.type == "cuda"  # one kernel for the whole step, as plain training uses
        # Only what trains: everything without LoRA, the adapters (and a value head) with it.
        self.policy_opt = torch.optim.AdamW(lora.trainable(self.policy), lr=lc.lr, fused=fused)
        self.critic_opt = (
            torch.optim.AdamW(lora.trainable(self.critic), lr=lc.critic_lr, fused=fused) if self.critic else None
        )
        self.kl_controller = make_kl_controller(lc.kl.coef, lc.kl.target, lc.kl.horizon)
        self.version = 0
        self.finite_steps = FiniteSteps(lc.max_nonfinite_steps, lc.lr)
        self.micro_batches_done = 0  # forward passes so far: what the driver's stall watch sees advance
        self.checkpoint_group = dist.checkpoint_group() if world_size > 1 else None
        self.checkpoints = CheckpointWriter(self)

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

    # -- scoring ---------------------------------------------------------------------------------

    def evaluate(self, batch: SampleBatch) -> Evaluated:
        """Old policy logprobs, reference logprobs, values and entropies of every response token."""
        return evaluation.evaluate(self, batch)

    def reference_pass(self, tokens: TokenBatch) -> PolicyOutput:
        """The reference's outputs on `tokens` (in a no-grad pass): the frozen copy's, or under LoRA the
        policy's with its adapters off."""
        if self.lora is None:
            return self.reference(tokens, self.temperature)
        with self.lora.off():
            return self.policy(tokens, self.temperature)

    def scoring(self) -> contextlib.ExitStack:
        """The context of the no-grad passes: under LoRA, policy and critic without dropout (the model
        the engines serve); nothing changes without it."""
        stack = contextlib.ExitStack()
        if self.lora is not None:
            for module in filter(None, (self.policy, self.critic)):
                stack.enter_context(lora.no_dropout(module))
        return stack

    def assign_advantages(self, batch: SampleBatch, ev: Evaluated):
        """(token rewards, kl, advantages, returns), each (N, T), by `learner.estimator`."""
        lc = self.cfg
        scores = torch.tensor(batch.scores, dtype=torch.float32, device=self.device)
        turns = None if batch.turn_rewards is None else batch.padded(batch.turn_rewards).to(self.device)
        rewards, kl = token_rewards(
            scores, ev.old_logprobs, ev.ref_logprobs, ev.mask, self.kl_controller.coef, lc.kl.estimator, turns
        )
        groups = torch.tensor(batch.groups, device=self.device)
        advantages, returns = estimate(rewards, ev.values, ev.mask, groups, lc)
        return rewards, kl, advantages, returns

    # -- learning --------------------------------------------------------------------------------

    def update(
        self, batch: SampleBatch, ev: Evaluated, advantages: torch.Tensor, returns: torch.Tensor, kl: torch.Tensor
    ) -> dict[str, float]:
        """ppo_epochs x minibatches x micro-batches (learner/update.py); the iteration's stats."""
        return update.update(self, batch, ev, advantages, returns, kl)

    def values(self, tokens: TokenBatch, policy: PolicyOutput) -> torch.Tensor:
        """(B, T) values: the separate critic's, the shared head's, or zeros without a critic."""
        if self.critic is not None:
            return self.critic(tokens)
        if policy.values is not None:
            return policy.values
        return torch.zeros_like(policy.logprobs)

    # -- weights and checkpoints -----------------------------------------------------------------

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
        local = [
            p.detach().to_local() if hasattr(p, "to_local") else p.detach()
            for module in filter(None, (self.policy, self.critic))
            for p in module.parameters()
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

    def versioned_weights(self) -> tuple[int, list[tuple[str, torch.Tensor]] | None]:
        """(version, weights) read together, for an engine restarted between collective syncs."""
        return self.version, self.export_weights()
