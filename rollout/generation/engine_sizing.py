"""How big the engine's batch and KV cache are: one function, used by the engine and by `rollout plan`.

A rollout worker's memory is set here, never by `rollout.prompts_per_iteration`: the engine
schedules at most `max_num_seqs` sequences per step, its CPU KV cache holds that many sequences of
`max_model_len` tokens, and `window` sequences at most are handed to it at once (the rest of a
chunk waits in the worker as token ids, and is fed in as sequences finish, so the engine never
drains between windows). An explicit setting in the config always wins.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from contracts.config import RolloutConfig

CPU_MAX_NUM_SEQS = 256  # vLLM's own default on CPU: a 2-core machine gains nothing from more
MIN_BATCHED_TOKENS = 4096  # vLLM's default token budget of one step
CPU_KV_CACHE_GIB = (1, 8)  # the CPU cache's bounds, in GiB, when sized from the batch
WINDOW_BATCHES = 2  # sequences in the engine at once, in engine batches: one running, one waiting


@dataclass(frozen=True)
class EngineSizing:
    max_num_seqs: int | None  # None: vLLM's default for the GPU it finds
    max_num_batched_tokens: int | None
    cpu_kv_cache_gib: int | None  # None on GPU, where rollout.gpu_memory_utilization sizes it

    def window(self, scheduled_seqs: int) -> int:
        """Sequences (prompts x n) in the engine at once, given the batch the engine scheduled."""
        return WINDOW_BATCHES * scheduled_seqs

    def describe(self, device: str) -> str:
        seqs = self.max_num_seqs if self.max_num_seqs is not None else "vLLM's default"
        tokens = self.max_num_batched_tokens if self.max_num_batched_tokens is not None else "vLLM's default"
        kv = (
            f"CPU KV cache {self.cpu_kv_cache_gib} GiB"
            if device == "cpu"
            else "KV cache in what rollout.gpu_memory_utilization leaves"
        )
        return (
            f"engine batch: max_num_seqs {seqs}, max_num_batched_tokens {tokens}, {kv}; requests fed in "
            f"windows of {WINDOW_BATCHES} x max_num_seqs sequences"
        )


def engine_sizing(cfg: RolloutConfig, device: str, kv_bytes_per_token: float) -> EngineSizing:
    """The engine's batch and cache for `device` ("cpu" or "cuda") and a model whose keys and values
    take `kv_bytes_per_token` bytes per token."""
    if device != "cpu":
        return EngineSizing(cfg.max_num_seqs, cfg.max_num_batched_tokens, None)
    seqs = cfg.max_num_seqs or CPU_MAX_NUM_SEQS
    # Without chunked prefill a step takes whole prompts: the budget holds the longest sequence.
    tokens = cfg.max_num_batched_tokens or max(MIN_BATCHED_TOKENS, seqs, cfg.max_model_len)
    if cfg.cpu_kv_cache_gb is not None:
        gib = cfg.cpu_kv_cache_gb
    else:
        low, high = CPU_KV_CACHE_GIB
        gib = min(high, max(low, seqs * cfg.max_model_len * kv_bytes_per_token / 2**30))
    return EngineSizing(seqs, tokens, max(1, math.ceil(gib)))
