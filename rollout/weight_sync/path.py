"""Which of the two weight-sync paths a job takes; imports no torch, so `rollout plan` can ask."""

from __future__ import annotations

from contracts.config import JobConfig
from contracts.device import resolve_device


def weight_sync_path(cfg: JobConfig) -> str:
    """ "object_store" or "collective", `rollout.weight_sync` with auto resolved."""
    if cfg.rollout.weight_sync != "auto":
        return cfg.rollout.weight_sync
    on_gpu = resolve_device(cfg.rollout.device) == "cuda" and resolve_device(cfg.learner.device) == "cuda"
    return "collective" if on_gpu else "object_store"
