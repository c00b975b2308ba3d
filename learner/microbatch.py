"""Which rows each rank runs, in which micro-batches: a plan every rank computes alike from the lengths.

Rows are dealt to ranks longest first, each to the rank with the fewest tokens so far, and each
rank groups its rows, sorted by length, into micro-batches whose size stays within the token budget:
the padded size (rows x (longest prompt + longest response)), or, when the micro-batches are packed
into one row (`learner.pack_sequences`), the real tokens (the sum of the rows' lengths). FSDP's collectives need every rank to run the
same number of forward passes, so a rank with fewer micro-batches is given filler ones (a single row,
weighted 0).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class MicroBatch:
    rows: np.ndarray  # (b,) int64 row indices into the SampleBatch
    filler: bool = False  # run only to keep the ranks' collectives in step; its outputs are discarded


def deal(rows: np.ndarray, cost: np.ndarray, world_size: int) -> list[np.ndarray]:
    """Split `rows` over ranks so each gets about the same total `cost` (tokens). Deterministic."""
    load = np.zeros(world_size)
    shares: list[list[int]] = [[] for _ in range(world_size)]
    for row in rows[np.argsort(-cost[rows], kind="stable")]:
        rank = int(np.argmin(load))
        shares[rank].append(int(row))
        load[rank] += cost[row]
    return [np.sort(np.array(s, dtype=np.int64)) for s in shares]


def pack(
    rows: np.ndarray, prompt_lengths: np.ndarray, response_lengths: np.ndarray, budget: int, packed: bool = False
) -> list[np.ndarray]:
    """Length-sorted rows in micro-batches of at most `budget` tokens, padded or `packed` (a longer
    row runs alone)."""
    order = rows[np.argsort(prompt_lengths[rows] + response_lengths[rows], kind="stable")]
    batches, current, width_p, width_t, tokens = [], [], 0, 0, 0
    for row in order:
        p, t = int(prompt_lengths[row]), int(response_lengths[row])
        wp, wt = max(width_p, p), max(width_t, t, 1)  # a padded batch has a response column even when empty
        size = tokens + p + t if packed else (len(current) + 1) * (wp + wt)
        if current and size > budget:
            batches.append(np.array(current, dtype=np.int64))
            current, wp, wt, tokens = [], p, max(t, 1), 0
        current.append(int(row))
        width_p, width_t, tokens = wp, wt, tokens + p + t
    if current:
        batches.append(np.array(current, dtype=np.int64))
    return batches


def plan(
    rows: np.ndarray,
    prompt_lengths: np.ndarray,
    response_lengths: np.ndarray,
    budget: int,
    world_size: int,
    packed: bool = False,
) -> list[list[MicroBatch]]:
    """Per rank, its micro-batches over `rows`; every rank gets the same number."""
    cost = prompt_lengths + np.maximum(response_lengths, 1)
    shares = deal(rows, cost, world_size)
    per_rank = [pack(share, prompt_lengths, response_lengths, budget, packed) for share in shares]
    steps = max(1, max(len(batches) for batches in per_rank))
    filler = MicroBatch(rows[:1], filler=True)
    return [[MicroBatch(b) for b in batches] + [filler] * (steps - len(batches)) for batches in per_rank]
