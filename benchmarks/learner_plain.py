"""The yardstick of `learner_gpu.py`: an ideal PPO iteration with a critic in plain transformers.

What PPO cannot do with less: 3 no-grad forward passes (policy, reference, critic) and 2 training
passes (the policy with transformers' own LM loss, the critic backbone with a value head), over the
same tokens as the learner, in padded micro-batches of the same token budget sorted by length over
the whole batch (where PPO's random minibatches pad more), autocast in the compute dtype, fused AdamW
on CUDA, an optimizer step per `minibatch` samples. Nothing else: no advantages, no clipping, no
per-token bookkeeping.
"""

from __future__ import annotations

import time

import numpy as np
import torch
from transformers import AutoModel, AutoModelForCausalLM

from learner.microbatch import plan
from learner.samples import SampleBatch


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def set_checkpointing(backbones, on: bool) -> None:
    """Gradient checkpointing on or off for transformers models, as the Learner sets it."""
    for backbone in backbones:
        if on:
            backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        else:
            backbone.gradient_checkpointing_disable()


class PlainIteration:
    def __init__(self, path: str, device: torch.device, compute_dtype: torch.dtype):
        self.device, self.compute_dtype = device, compute_dtype
        self.policy = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device).train()
        self.vocab_size = self.policy.config.vocab_size
        self.critic = AutoModel.from_pretrained(path, dtype=torch.float32).to(device).train()
        self.head = torch.nn.Linear(self.critic.config.hidden_size, 1, device=device)
        reference = AutoModelForCausalLM.from_pretrained(path, dtype=compute_dtype).to(device)
        self.reference = reference.eval().requires_grad_(False)
        fused = device.type == "cuda"
        self.policy_opt = torch.optim.AdamW(self.policy.parameters(), lr=1e-6, fused=fused)
        critic_parameters = [*self.critic.parameters(), *self.head.parameters()]
        self.critic_opt = torch.optim.AdamW(critic_parameters, lr=1e-5, fused=fused)

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=self.compute_dtype, enabled=self.compute_dtype != torch.float32)

    def _micro_batches(self, batch: SampleBatch, budget: int):
        """(rows, model inputs, labels) per micro-batch, laid out on the host as the learner does."""
        for micro in plan(np.arange(len(batch)), batch.prompt_lengths, batch.response_lengths, budget, 1)[0]:
            tokens = batch.collate(micro.rows, 0).to(self.device)
            labels = torch.full_like(tokens.input_ids, -100)
            P = tokens.prompt_width
            labels[:, P:] = torch.where(tokens.mask.bool(), tokens.responses, -100)
            inputs = {"input_ids": tokens.input_ids, "attention_mask": tokens.attention_mask}
            yield micro.rows, {**inputs, "position_ids": tokens.position_ids}, labels

    def run(self, batch: SampleBatch, budget: int, minibatch: int) -> dict[str, float]:
        """One iteration; seconds of its `values` (no-grad) and `update` (training) stages."""
        stages = {}
        start = time.perf_counter()
        with torch.no_grad(), self._autocast():
            for _, inputs, _ in self._micro_batches(batch, budget):
                self.policy(**inputs).logits
                self.reference(**inputs).logits
                self.head(self.critic(**inputs).last_hidden_state)
        synchronize(self.device)
        stages["values"] = time.perf_counter() - start
        start = time.perf_counter()
        rows = 0
        for micro_rows, inputs, labels in self._micro_batches(batch, budget):
            with self._autocast():
                self.policy(**inputs, labels=labels).loss.backward()
                values = self.head(self.critic(**inputs).last_hidden_state).float()
                values.square().mean().backward()
            rows += len(micro_rows)
            if rows >= minibatch:
                self._step()
                rows = 0
        if rows:
            self._step()
        synchronize(self.device)
        stages["update"] = time.perf_counter() - start
        return stages

    def _step(self) -> None:
        for opt in (self.policy_opt, self.critic_opt):
            opt.step()
            opt.zero_grad(set_to_none=True)
