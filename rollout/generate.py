"""`rollout generate`: prompts -> rollout workers -> reward workers -> archive, no learning.

Chunks are scored and archived as they complete; learner columns stay null.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import ray
from tqdm import tqdm

from learner.device import resolve_device
from learner.tiny_model import resolve_model_path
from reward.worker import apply_rewards, spawn_reward_workers
from rollout.archive import ArchiveWriter
from rollout.config import JobConfig, check, to_yaml
from rollout.pool import WorkerPool
from rollout.prompts import load_prompts
from rollout.rendering import PromptRenderer
from rollout.session import init_ray


def generate(cfg: JobConfig, out: Path, *, log=sys.stderr) -> dict:
    check(cfg, cuda_available=resolve_device("auto") == "cuda")
    from transformers import AutoTokenizer

    model = resolve_model_path(cfg.model.path)
    records = load_prompts(cfg.data, cfg.seed, log=log)
    by_id = {r.prompt_id: r for r in records}
    renderer = PromptRenderer(AutoTokenizer.from_pretrained(model), cfg.model.max_prompt_tokens)
    tasks = [renderer.render(r) for r in records]
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(to_yaml(cfg))
    init_ray(cfg, learner=False)
    run_id = f"{cfg.run_name}-generate"
    reward_workers = spawn_reward_workers(cfg.reward)
    pool = WorkerPool(cfg, model)
    metadata = {"run_id": run_id, "model": model, "config": to_yaml(cfg),
                "temperature": repr(cfg.rollout.sampling.temperature)}
    start = time.perf_counter()
    tokens = 0
    rewards: list[float] = []
    with ArchiveWriter(out / "rollouts", metadata, batch_rows=cfg.archive.batch_rows,
                       rows_per_file=cfg.archive.rows_per_file) as archive, \
            tqdm(total=len(tasks) * cfg.rollout.n_samples, unit="sample", file=log, desc="generate") as bar:
        pending = []
        for n, result in enumerate(pool.generate(tasks, run_id=run_id, iteration=0)):
            items = [(by_id[r.prompt_id], r.prompt, r.response) for r in result.records]
            pending.append((reward_workers[n % len(reward_workers)].score.remote(items), result.records))
            tokens += result.generated_tokens
            bar.update(len(result.records))
            bar.set_postfix(tok_s=f"{tokens / (time.perf_counter() - start):.0f}")
            pending = _archive_scored(pending, archive, rewards)
        _archive_scored(pending, archive, rewards, wait=True)
    pool.shutdown()
    seconds = time.perf_counter() - start
    summary = {"samples": len(rewards), "prompts": len(tasks), "generated_tokens": tokens, "seconds": seconds,
               "tokens_per_s": tokens / seconds, "reward_mean": sum(rewards) / max(1, len(rewards))}
    print(f"generated {summary['samples']} samples ({len(tasks)} prompts x {cfg.rollout.n_samples}), "
          f"{tokens} tokens in {seconds:.1f}s ({summary['tokens_per_s']:.0f} tok/s), "
          f"mean reward {summary['reward_mean']:.3f} -> {out / 'rollouts'}", file=log)
    return summary


def _archive_scored(pending: list, archive: ArchiveWriter, rewards: list[float], wait: bool = False) -> list:
    """Archive every chunk whose rewards are in (all of them with `wait`); return the rest."""
    if not pending:
        return pending
    refs = [ref for ref, _ in pending]
    ready, _ = ray.wait(refs, num_returns=len(refs) if wait else len(refs), timeout=None if wait else 0)
    ready = set(ready)
    rest = []
    for ref, records in pending:
        if ref not in ready:
            rest.append((ref, records))
            continue
        apply_rewards(records, ray.get(ref))
        rewards.extend(r.reward for r in records)
        archive.write(records)
    return rest
