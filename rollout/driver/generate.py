"""`rollout generate`: prompts -> rollout workers -> reward workers -> archive, no learning.

Chunks are scored and archived as they complete; learner columns stay null.
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
    tasks = [data.tasks[r.prompt_id] for r in data.records]
    scorers = RewardWorkers(cfg.reward, start_timeout_s=cfg.ray.actor_start_timeout_s, log=log)
    pool = RolloutWorkers.of_job(cfg, model, log=log)
    scorers.wait_started()
    manifest = RunManifest(out, run_id)
    metadata = run_metadata(cfg, run_id, model, manifest.start_run(cfg, model), learner=False)
    timeout = cfg.rollout.iteration_timeout_s
    started = time.perf_counter()
    tokens, rewards = 0, []
    generation = pool.submit(tasks, run_id=run_id, iteration=0, scorers=scorers, records=data.records_by_id)
    components = reward_components(cfg.reward)
    total = len(tasks) * cfg.rollout.n_samples
    with ArchiveWriter(
        out / "rollouts",
        metadata,
        components,
        batch_rows=cfg.archive.batch_rows,
        rows_per_file=cfg.archive.rows_per_file,
    ) as archive:
        for chunk in generation.chunks_with_progress(total, "generate", log, leave=True):
            [reward], _ = scorers.scores([chunk], timeout, "the rewards of `rollout generate`")
            archive.write_later(
                lambda batch=chunk.batch, reward=reward: archive_batches(
                    [ray.get(batch, timeout=timeout)], [reward], None, components
                )
            )
            rewards.append(reward.column("reward").to_numpy(zero_copy_only=False))
            tokens += chunk.summary.generated_tokens
    pool.release()
    scorers.release()
    manifest.iteration(0, generated_by=[0], policy_version=0)
    seconds = time.perf_counter() - started
    all_rewards = np.concatenate(rewards) if rewards else np.zeros(0)
    summary = {
        "samples": len(all_rewards),
        "prompts": len(tasks),
        "generated_tokens": tokens,
        "seconds": seconds,
        "tokens_per_s": tokens / seconds,
        "reward_mean": float(all_rewards.mean()) if len(all_rewards) else 0.0,
    }
    print(
        f"generated {summary['samples']} samples ({len(tasks)} prompts x {cfg.rollout.n_samples}), "
        f"{tokens} tokens in {seconds:.1f}s ({summary['tokens_per_s']:.0f} tok/s), "
        f"mean reward {summary['reward_mean']:.3f} -> {out / 'rollouts'}",
        file=log,
    )
    return summary
