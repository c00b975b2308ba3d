"""`rollout generate`: prompts -> rollout workers -> reward workers -> archive, no learning.

The job's collector streams one pass over the prompts; chunks are scored and archived as they complete
(learner columns stay null), and the run fails, as `rollout run` does, when its environment fails more
than `env.max_error_fraction` of the episodes. The workers are released however it ends.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import ray

from contracts.config import JobConfig
from reward.worker import reward_components
from rollout.actors.reward_workers import RewardWorkers
from rollout.actors.rollout_workers import RolloutWorkers
from rollout.archive import ArchiveWriter
from rollout.archive.columns import archive_batches
from rollout.archive.manifest import RunManifest
from rollout.archive.metadata import run_metadata
from rollout.driver import stopping
from rollout.driver.collector import Collector
from rollout.driver.startup import RunData, lock_run_dir, read_data, start_cluster


def generate(cfg: JobConfig, out: Path, *, log=None) -> dict:
    log = log or sys.stderr
    data = read_data(cfg, log)
    lock = lock_run_dir(out, log)
    stopping.install()
    try:
        return _generate(start_cluster(cfg, out, learner=False), out, data, log)
    finally:
        lock.release()


def _generate(cfg: JobConfig, out: Path, data: RunData, log) -> dict:
    run_id, model = f"{cfg.run_name}-generate", data.base_model
    rewards = RewardWorkers(cfg.reward, start_timeout_s=cfg.ray.actor_start_timeout_s, log=log)
    workers = None
    try:
        workers = RolloutWorkers.of_job(cfg, model, log=log)
        rewards.wait_started()
        collector = Collector(cfg, data, workers, rewards, run_id=run_id, log=log)
        summary = _archived(cfg, out, data, collector, run_id)
    finally:
        for group in (workers, rewards):
            if group is not None:
                group.release()
    print(
        f"generated {summary['samples']} samples ({summary['prompts']} prompts x {cfg.rollout.n_samples}), "
        f"{summary['generated_tokens']} tokens in {summary['seconds']:.1f}s ({summary['tokens_per_s']:.0f} tok/s), "
        f"mean reward {summary['reward_mean']:.3f} -> {out / 'rollouts'}",
        file=log,
    )
    return summary


def _archived(cfg: JobConfig, out: Path, data: RunData, collector: Collector, run_id: str) -> dict:
    """Every prompt's samples archived with their rewards as their chunks are scored; the manifest's
    iteration 0 once all are in; the figures `rollout generate` prints."""
    model, manifest = data.base_model, RunManifest(out, run_id)
    metadata = run_metadata(cfg, run_id, model, manifest.start_run(cfg, model), learner=False)
    timeout = cfg.rollout.iteration_timeout_s
    started = time.perf_counter()
    tokens, rewards = 0, []
    components = reward_components(cfg.reward)
    with ArchiveWriter(
        out / "rollouts",
        metadata,
        components,
        batch_rows=cfg.archive.batch_rows,
        rows_per_file=cfg.archive.rows_per_file,
    ) as archive:
        for chunk, reward in collector.stream("generate", "the rewards of `rollout generate`"):
            archive.write_later(
                lambda batch=chunk.batch, reward=reward: archive_batches(
                    [ray.get(batch, timeout=timeout)], [reward], None, components
                )
            )
            rewards.append(reward.column("reward").to_numpy(zero_copy_only=False))
            tokens += chunk.summary.generated_tokens
    manifest.iteration(0, generated_by=[0], policy_version=0)
    seconds = time.perf_counter() - started
    all_rewards = np.concatenate(rewards) if rewards else np.zeros(0)
    return {
        "samples": len(all_rewards),
        "prompts": len(data.prompts),
        "generated_tokens": tokens,
        "seconds": seconds,
        "tokens_per_s": tokens / seconds,
        "reward_mean": float(all_rewards.mean()) if len(all_rewards) else 0.0,
    }
