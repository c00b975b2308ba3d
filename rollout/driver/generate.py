"""`rollout generate`: prompts -> rollout workers -> reward workers -> archive, no learning.

Chunks are scored and archived as they complete; learner columns stay null.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import ray
from tqdm import tqdm

from contracts.builtin_model import resolve_model_path
from contracts.config import JobConfig
from contracts.config_load import check, to_yaml
from contracts.console import configure_driver
from contracts.rendering import PromptRenderer, render_prompts
from reward.worker import check_reward_model, reward_components
from rollout.archive import ArchiveWriter
from rollout.archive.columns import archive_batches
from rollout.archive.manifest import RunManifest
from rollout.driver import stopping
from rollout.driver.prompts import load_prompts
from rollout.driver.resources import check_fits, node_resources, resolve_devices
from rollout.driver.reward_group import RewardGroup
from rollout.driver.run_lock import RunLock
from rollout.driver.session import init_ray
from rollout.generation.pool import WorkerPool


def generate(cfg: JobConfig, out: Path, *, log=None) -> dict:
    log = log or sys.stderr
    check(cfg)  # devices are checked against the cluster once it is joined
    from transformers import AutoTokenizer

    model = resolve_model_path(cfg.model.path)
    check_reward_model(cfg.reward)
    renderer = PromptRenderer(AutoTokenizer.from_pretrained(model), cfg.model.max_prompt_tokens)
    records, rendered = render_prompts(load_prompts(cfg.data, cfg.seed, log=log), renderer,
                                       on_bad_record=cfg.data.on_bad_record, source=cfg.data.prompts, log=log)
    tasks = [rendered[r.prompt_id] for r in records]
    lock = RunLock.acquire(out)  # one writer per directory, as for `rollout run`
    stopping.install()
    try:
        return _generate(cfg, out, records, tasks, model, log)
    finally:
        lock.release()


def _generate(cfg: JobConfig, out: Path, records: list, tasks: list, model: str, log) -> dict:
    configure_driver(out)
    (out / "config.yaml").write_text(to_yaml(cfg))
    init_ray(cfg, learner=False)
    stopping.install()  # again: ray.init installs its own SIGTERM handler
    cfg = resolve_devices(cfg, ray.cluster_resources())
    check_fits(cfg, ray.cluster_resources(), learner=False, nodes=node_resources())
    run_id = f"{cfg.run_name}-generate"
    scorers = RewardGroup(cfg.reward, log)
    pool = WorkerPool(cfg, model)
    manifest = RunManifest(out, run_id)
    start = manifest.start_run(cfg, model)
    metadata = {"run_id": run_id, "model": model, "config": to_yaml(cfg), "manifest": json.dumps(start),
                "temperature": repr(cfg.rollout.sampling.temperature)}
    timeout = cfg.rollout.iteration_timeout_s
    started = time.perf_counter()
    tokens, rewards = 0, []
    generation = pool.submit(tasks, run_id=run_id, iteration=0, scorers=scorers.workers,
                             records={r.prompt_id: r for r in records})
    components = reward_components(cfg.reward)
    with ArchiveWriter(out / "rollouts", metadata, components, batch_rows=cfg.archive.batch_rows,
                       rows_per_file=cfg.archive.rows_per_file) as archive, \
            tqdm(total=len(tasks) * cfg.rollout.n_samples, unit="sample", file=log, desc="generate") as bar:
        for chunk in generation.chunks():
            [reward], _ = scorers.scores([chunk], timeout, "the rewards of `rollout generate`")
            archive.write_later(lambda batch=chunk.batch, reward=reward:
                                archive_batches([ray.get(batch, timeout=timeout)], [reward], None, components))
            rewards.append(reward.column("reward").to_numpy(zero_copy_only=False))
            tokens += chunk.summary.generated_tokens
            bar.update(chunk.summary.samples)
            bar.set_postfix(tok_s=f"{tokens / (time.perf_counter() - started):.0f}")
    pool.shutdown()
    scorers.shutdown()
    manifest.iteration(0, generated_by=[pool.version], policy_version=pool.version)
    seconds = time.perf_counter() - started
    all_rewards = np.concatenate(rewards) if rewards else np.zeros(0)
    summary = {"samples": len(all_rewards), "prompts": len(tasks), "generated_tokens": tokens, "seconds": seconds,
               "tokens_per_s": tokens / seconds, "reward_mean": float(all_rewards.mean()) if len(all_rewards) else 0.0}
    print(f"generated {summary['samples']} samples ({len(tasks)} prompts x {cfg.rollout.n_samples}), "
          f"{tokens} tokens in {seconds:.1f}s ({summary['tokens_per_s']:.0f} tok/s), "
          f"mean reward {summary['reward_mean']:.3f} -> {out / 'rollouts'}", file=log)
    return summary
