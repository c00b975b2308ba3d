"""The no-grad passes of an iteration: old and reference logprobs, values and entropies of every
response token (`evaluate`, into `Evaluated`), and putting the rows each rank scored back into the
batch's order.

Every micro-batch's outputs stay on the device until the whole batch is scored: the loop never waits
for the device, so on a GPU the host lays out the next micro-batch while the last one runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from learner import distributed as dist
from learner.batch import to_device
from learner.microbatch import MicroBatch
from learner.samples import SampleBatch, token_spans

if TYPE_CHECKING:
    from learner.learner import Learner


@dataclass
class Evaluated:
    """Per-token outputs over the whole batch, (N, T) float32, zero on padding and at an episode's
    environment tokens (`mask` is 1 at the model's tokens only)."""

    mask: torch.Tensor
    old_logprobs: torch.Tensor  # the learner's, before the update: PPO's proximal policy
    ref_logprobs: torch.Tensor
    values: torch.Tensor
    entropy: torch.Tensor
    behaviour_logprobs: torch.Tensor  # the engine's, when it sampled


@torch.no_grad()
def evaluate(learner: Learner, batch: SampleBatch) -> Evaluated:
    """The three forward passes (policy, reference, critic unless shared) of every micro-batch, this
    rank's share of the rows, gathered from every rank. Under LoRA the reference pass is the policy's
    with its adapters off, and no pass has dropout (`Learner.scoring`)."""
    plans = learner.plan(batch, np.arange(len(batch)))
    outputs = []
    with learner.scoring():
        for micro in plans[learner.rank]:
            tokens = learner.collate(batch, micro.rows)
            with learner.compute():
                policy = learner.policy(tokens, learner.temperature, with_entropy=True)
                ref = learner.reference_pass(tokens)
                values = learner.values(tokens, policy)
            learner.micro_batches_done += 1
            if not micro.filler:
                columns = (policy.logprobs, ref.logprobs, values, policy.entropy)
                outputs.append(torch.stack([tokens.gather(c) for c in columns], dim=1))
    local = torch.cat(outputs) if outputs else torch.zeros((0, 4), device=learner.device)
    flat = in_batch_order(batch, plans, local)
    device = learner.device
    mask = to_device(batch.padded(batch.loss_mask), device)  # an episode's environment tokens are 0
    old, ref, values, entropy = (batch.padded(flat[:, c]) * mask for c in range(4))
    behaviour = to_device(batch.padded(batch.behaviour_logprobs), device) * mask
    return Evaluated(mask, old, ref, values, entropy, behaviour)


def in_batch_order(batch: SampleBatch, plans: list[list[MicroBatch]], local: torch.Tensor) -> torch.Tensor:
    """(response tokens, C) in the batch's token order, on `local`'s device, from every rank's `local`
    (its own rows' tokens in its plan's order, (tokens, C)); a collective: every rank calls it."""
    # Every rank's rows in rank order, then the tokens of each back to their place in the batch.
    order = np.concatenate(
        [np.concatenate([m.rows for m in p if not m.filler] or [np.zeros(0, np.int64)]) for p in plans]
    )
    counts = [int(sum(batch.response_lengths[m.rows].sum() for m in p if not m.filler)) for p in plans]
    gathered = dist.gather_rows(local, counts)
    _, destination, _ = token_spans(batch.response_offsets[order], batch.response_lengths[order])
    flat = torch.empty_like(gathered)
    flat[to_device(torch.from_numpy(destination), gathered.device)] = gathered
    return flat
