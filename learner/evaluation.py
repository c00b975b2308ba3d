"""What the no-grad passes of an iteration (`Learner.evaluate`) give: old and reference logprobs, values and
entropies of every response token (`Evaluated`), from the rows each rank scored put back into the batch's
order (`in_batch_order`)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from learner import distributed as dist
from learner.batch import to_device
from learner.microbatch import MicroBatch
from learner.samples import SampleBatch, token_spans


@dataclass
class Evaluated:
    """Per-token outputs over the whole batch, (N, T) float32, zero on padding and at an episode's
    environment tokens (`mask` is 1 at the model's tokens only)."""

    mask: torch.Tensor
    old_logprobs: torch.Tensor  # the learner's, before the update: PPO's proximal policy
    ref_logprobs: torch.Tensor
    values: torch.Tensor
    entropy: torch.Tensor | None  # None: no policy pass measured it (learner.old_logprobs behaviour)
    behaviour_logprobs: torch.Tensor  # the engine's, when it sampled
    teacher_logprobs: torch.Tensor | None = None  # learner.teacher's of the sampled tokens; None: no teacher


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
