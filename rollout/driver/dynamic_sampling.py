"""Dynamic sampling (DAPO): which prompt groups of an iteration carry a signal, and how many more prompts
to generate for the groups still missing.

A group is a prompt's `n` samples, consecutive rows of a chunk (a rollout worker writes each prompt's
samples together). Its samples all got the same reward: a group estimator gives each an advantage of 0,
so the group is left out of the update (its rows archived with trained false).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pyarrow as pa


@dataclass
class Selection:
    rows: list[np.ndarray]  # per chunk, (rows,) bool: the samples the update uses
    kept: int  # groups with a signal, up to `wanted`
    filtered: int  # groups without one


def select(rewards: list[pa.RecordBatch], n: int, wanted: int) -> Selection:
    """The first `wanted` groups (in chunk order) whose rewards differ; every other group's rows left out."""
    rows, kept, filtered = [], 0, 0
    for batch in rewards:
        reward = batch.column("reward").to_numpy(zero_copy_only=False).astype(np.float64)
        signal = group_signal(reward, np.arange(len(reward)) // n)
        take = np.zeros(len(signal), dtype=bool)
        for g in np.flatnonzero(signal):
            if kept < wanted:
                take[g], kept = True, kept + 1
        filtered += int((~signal).sum())
        rows.append(np.repeat(take, n))
    return Selection(rows, kept, filtered)


def group_signal(rewards: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """(G,) bool: whether group g's rewards differ, for groups numbered 0..G-1 by `groups` ((N,) int);
    a failed score (NaN) is no signal."""
    count = int(groups.max(initial=-1)) + 1
    finite = np.isfinite(rewards)
    high, low = np.full(count, -np.inf), np.full(count, np.inf)
    np.maximum.at(high, groups[finite], rewards[finite])
    np.minimum.at(low, groups[finite], rewards[finite])
    return high > low


def round_size(needed: int, kept: int, groups: int, limit: int) -> int:
    """Prompts to generate for `needed` more groups with a signal, at the rate seen so far (`kept` of
    `groups`; at least one in ten assumed), at most `limit`."""
    rate = max(kept / max(groups, 1), 0.1)
    return max(1, min(limit, math.ceil(needed / rate)))
