"""What the no-grad passes of an iteration produce (`Evaluated`), and putting the rows each rank
scored back into the batch's order."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from learner import distributed as dist
from learner.microbatch import MicroBatch
from learner.samples import SampleBatch, token_spans


@dataclass
class Evaluated:
    """Per-token outputs over the whole batch, (N, T) float32, zero on padding."""

    mask: torch.Tensor
    old_logprobs: torch.Tensor  # the learner's, before the update: PPO's proximal policy
    ref_logprobs: torch.Tensor
    values: torch.Tensor
    entropy: torch.Tensor
    behaviour_logprobs: torch.Tensor  # the engine's, when it sampled


def in_batch_order(batch: SampleBatch, plans: list[list[MicroBatch]], local: torch.Tensor) -> np.ndarray:
    """(response tokens, C) float32 in the batch's token order, from every rank's `local` (its own
    rows' tokens in its plan's order, (tokens, C)); a collective: every rank calls it."""
    # Every rank's rows in rank order, then the tokens of each back to their place in the batch.
    order = np.concatenate(
        [np.concatenate([m.rows for m in p if not m.filler] or [np.zeros(0, np.int64)]) for p in plans]
    )
    counts = [int(sum(batch.response_lengths[m.rows].sum() for m in p if not m.filler)) for p in plans]
    gathered = dist.gather_rows(local, counts).cpu().numpy()
    _, destination, _ = token_spans(batch.response_offsets[order], batch.response_lengths[order])
    flat = np.empty((len(batch.response_ids), local.shape[1]), dtype=np.float32)
    flat[destination] = gathered
    return flat
