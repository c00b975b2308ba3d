"""The archive's file metadata: which keys a run, a generation and a replay write, in one place.

docs/archive.md lists them. The writer adds `schema_version`; replay and `rollout train-offline`
read `gamma`, `lam`, the KL settings, `model` and `config` back.
"""

from __future__ import annotations

import json

from contracts.config import JobConfig
from contracts.config.load import to_yaml


def learner_settings(
    gamma: float, lam: float, kl_coef: float | None, kl_estimator: str, kl_target: float | None
) -> dict[str, str]:
    """What advantages and token rewards in the archive were computed with; `kl_coef` None leaves the
    KL coefficient and target out (a replay that keeps each iteration's own)."""
    settings = {"gamma": repr(gamma), "lam": repr(lam), "kl_estimator": kl_estimator}
    if kl_coef is not None:
        settings.update(kl_coef=repr(kl_coef), kl_target=repr(kl_target))
    return settings


def run_metadata(cfg: JobConfig, run_id: str, model: str, start: dict, *, learner: bool) -> dict[str, str]:
    """A run's (`learner` true) or a generation's metadata; `start` is its manifest entry (RunManifest)."""
    metadata = {
        "manifest": json.dumps(start),
        "run_id": run_id,
        "model": model,
        "config": to_yaml(cfg),
        "temperature": repr(cfg.rollout.sampling.temperature),
    }
    if learner:
        lc = cfg.learner
        metadata.update(learner_settings(lc.gamma, lc.lam, lc.kl.coef, lc.kl.estimator, lc.kl.target))
        if lc.teacher is not None:  # its per-token reward is in token_rewards: replay keeps it
            metadata["distill_coef"] = repr(lc.teacher.coef)
    return metadata
