"""Per-iteration figures: one JSON line in `RUN_DIR/metrics.jsonl`, the same through Ray's metrics
(Prometheus), and a progress line for people."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

from contracts.files import append_text
from rollout.runtime.telemetry import metric_name, record_stages

STAGES = ("generate", "reward", "values", "advantages", "update", "weight_sync", "archive", "checkpoint")


def iteration_metrics(
    iteration: int,
    summaries,
    rewards: list[pa.RecordBatch],
    learn: dict[str, float],
    timings: dict[str, float],
    version: int,
) -> dict:
    """One iteration's figures from the generation summaries, the reward columns and the learner's stats."""
    samples = sum(s.samples for s in summaries)
    tokens = sum(s.generated_tokens for s in summaries)
    # Workers generate side by side: an iteration's generation time is its busiest worker's.
    busy: dict[str, float] = {}
    for s in summaries:
        busy[s.worker] = busy.get(s.worker, 0.0) + s.seconds
    reward = np.concatenate([r.column("reward").to_numpy(zero_copy_only=False) for r in rewards]).astype(np.float64)
    total_seconds = sum(timings.values())
    metrics = {
        "iteration": iteration,
        "samples": samples,
        "generated_tokens": tokens,
        "tokens_per_s": tokens / max(max(busy.values(), default=0.0), 1e-9),
        "samples_per_s": samples / max(total_seconds, 1e-9),
        "reward_mean": float(reward.mean()),
        "reward_std": float(reward.std()),
        "response_length_mean": tokens / max(samples, 1),
        "finish_stop_frac": sum(s.stopped for s in summaries) / max(samples, 1),
        "policy_version": version,
        "version_lag": version - 1 - min(s.policy_version for s in summaries),
    }
    turns = sum(s.turns for s in summaries)
    if turns:  # episodes: their turns, and the environment's between them (one fewer each)
        metrics["episode/turns_mean"] = turns / max(samples, 1)
        metrics["episode/env_turns_mean"] = (turns - samples) / max(samples, 1)
        metrics["episode/env_errors"] = sum(s.env_errors for s in summaries)
        metrics["episode/env_step_seconds"] = sum(s.env_step_seconds for s in summaries)
        resumed = sum(s.resumed_tokens for s in summaries)
        if resumed:  # the earlier turns' KV cache reused: how much of a later turn's prompt was not computed again
            metrics["episode/prefix_cached_fraction"] = sum(s.cached_tokens for s in summaries) / resumed
    for name, (values, absent) in _components(rewards).items():
        ok = values[~np.isnan(values)]
        metrics[f"reward/{name}"] = float(ok.mean()) if ok.size else float("nan")
        # A failed score is NaN; a component a sample has none of (an agent that returned None) is null.
        metrics[f"reward_failed/{name}"] = int(np.isnan(values).sum()) - absent
    metrics.update({k: float(v) for k, v in learn.items()})
    metrics.update({f"time/{stage}": float(timings.get(stage, 0.0)) for stage in STAGES})
    metrics["time/iteration"] = total_seconds
    return metrics


def _components(rewards: list[pa.RecordBatch]) -> dict[str, tuple[np.ndarray, int]]:
    """Each reward component's values over the iteration (NaN where null), from the struct columns, and
    how many of them are null."""
    structs = pa.chunked_array([r.column("reward_components") for r in rewards]).combine_chunks()
    return {
        field.name: (child.to_numpy(zero_copy_only=False).astype(np.float64), child.null_count)
        for field, child in zip(structs.type, structs.flatten())
    }


class MetricsLog:
    """Appends metrics lines and mirrors the numeric ones as Ray gauges (Prometheus)."""

    def __init__(self, path: Path):
        self.path = path
        self._gauges: dict[str, object] = {}
        self._last_line = time.perf_counter()  # the first line's wall time counts from the run's start
        self._restarts_seen: dict[str, int] = {}
        self._engine_counts: dict[str, tuple[int, int]] = {}  # each worker's engine steps and tokens, as last seen

    def add_wall_time(self, metrics: dict) -> None:
        """`time/wall`: seconds since the last line (the stages overlap, so it is not their sum)."""
        now = time.perf_counter()
        metrics["time/wall"], self._last_line = now - self._last_line, now

    def add_restarts(self, metrics: dict, restarts: dict[str, int]) -> None:
        """`restarts/KIND`: each kind's restarts since the last line, from `restarts`, its count so far."""
        for kind, count in restarts.items():
            metrics[f"restarts/{kind}"] = count - self._restarts_seen.get(kind, 0)
        metrics["restarts/reward"] = int(metrics.get("restarts/reward", 0))
        self._restarts_seen = restarts

    def add_step_fill(self, metrics: dict, summaries) -> None:
        """`engine/step_fill`: how full the engines' steps ran since the last line, the tokens they sampled over
        steps x the sequences a step holds (1: every step a full batch; a tail of long answers leaves the rest
        idle). Left out until a worker has reported twice, and for a worker whose engine restarted."""
        tokens = capacity = 0
        for worker in {s.worker for s in summaries}:
            mine = [s for s in summaries if s.worker == worker and s.batch_seqs]
            if not mine:
                continue
            last = max(mine, key=lambda s: s.engine_steps)
            before = self._engine_counts.get(worker)
            self._engine_counts[worker] = (last.engine_steps, last.engine_tokens)
            if before is None or last.engine_steps < before[0]:
                continue
            tokens += last.engine_tokens - before[1]
            capacity += (last.engine_steps - before[0]) * last.batch_seqs
        if capacity:
            metrics["engine/step_fill"] = tokens / capacity

    def write(self, metrics: dict) -> None:
        finite = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in metrics.items()}
        append_text(self.path, json.dumps(finite) + "\n")
        self._export(metrics)

    def _export(self, metrics: dict) -> None:
        try:
            import ray
            from ray.util.metrics import Gauge
        except ImportError:
            return
        if not ray.is_initialized():
            return
        record_stages({k[5:]: v for k, v in metrics.items() if k.startswith("time/") and k != "time/iteration"})
        for key, value in metrics.items():
            if not isinstance(value, (int, float)) or (isinstance(value, float) and math.isnan(value)):
                continue
            name = metric_name(key)
            if name not in self._gauges:
                self._gauges[name] = Gauge(name, description=f"PPO rollout service: {key} (per iteration)")
            self._gauges[name].set(float(value))

    @staticmethod
    def progress_line(m: dict, last_iteration: int) -> str:
        parts = [f"iter {m['iteration']}/{last_iteration}", f"reward {m['reward_mean']:+.3f}"]
        parts += [f"{k[7:]} {v:.3f}" for k, v in m.items() if k.startswith("reward/") and v == v]
        parts += [f"{k[8:]} {v:.3f}" for k, v in m.items() if k.startswith("distill/")]  # learner.teacher
        parts += [
            f"kl {m.get('kl', 0.0):.4f}",
            f"{m['tokens_per_s']:.0f} tok/s",
            f"len {m['response_length_mean']:.1f}",
            f"{m['time/iteration']:.1f}s",
        ]
        return "  ".join(parts)


def print_summary(history: list[dict], log) -> None:
    """`summary_lines`, then the samples, tokens and seconds of the run."""
    if not history:
        print("no iterations ran", file=log)
        return
    print("\n" + "\n".join(summary_lines(history)), file=log)
    seconds = sum(h["time/iteration"] for h in history)
    tokens = sum(h["generated_tokens"] for h in history)
    print(f"  {sum(h['samples'] for h in history)} samples, {tokens} tokens in {seconds:.0f}s", file=log)


def summary_lines(history: list[dict]) -> list[str]:
    """First vs last iteration and first vs last fifth, of the reward, each component and the distillation's
    reverse KL (learner.teacher): what `run` ends with, and `rollout stats` too (its per-iteration items carry the same names)."""
    fifth = max(1, len(history) // 5)
    keys = ["reward_mean"] + sorted({k for h in history for k in h if k.startswith(("reward/", "distill/"))})
    lines = [f"summary over {len(history)} iterations (first fifth = {fifth} iterations):"]
    for key in keys:
        values = [h.get(key) for h in history]
        values = [v for v in values if v is not None and v == v]
        if not values:
            continue
        head, tail = np.mean(values[:fifth]), np.mean(values[-fifth:])
        lines.append(
            f"  {key:28s} first {values[0]:.3f}  last {values[-1]:.3f}   "
            f"first fifth {head:.3f} -> last fifth {tail:.3f} ({tail - head:+.3f})"
        )
    return lines
