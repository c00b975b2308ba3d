"""The reward workers as Ray actors: each a `RewardWorker` (plain class, `reward/`) in a thin actor.

A worker whose process dies is restarted by Ray and runs the lost call again there (it holds no
state but its scorers). One that holds a chunk and scores nothing for `reward.stall_timeout_s` is
killed so that Ray restarts it the same way.
"""

from __future__ import annotations

import sys

import pyarrow as pa
import ray

from contracts.config import RewardConfig
from contracts.console import actor_options, route_actor_output
from reward.worker import RESTARTED, RewardWorker
from rollout.actors.stall import CONCURRENCY_GROUPS, PipelineTimeout, StallWatch, stalled_message, wait_watched
from rollout.actors.telemetry import announce_if_restarted
from rollout.generation.launch import Chunk


class _RewardActor(RewardWorker):
    """The Ray edge of a RewardWorker: its console output is filtered into its log first."""

    def __init__(self, *args, **kwargs):
        route_actor_output()
        super().__init__(*args, **kwargs)
        self._restarted = announce_if_restarted("reward", self.name)

    def __repr__(self) -> str:  # Ray names the actor by it in its errors and log lines
        return getattr(self, "name", type(self).__name__)  # asked for even when __init__ failed

    def score_batch(self, batch, records):
        rewards, seconds = super().score_batch(batch, records)
        if self._restarted:
            seconds, self._restarted = {**seconds, RESTARTED: 1.0}, False
        return rewards, seconds


class RewardGroup:
    def __init__(self, cfg: RewardConfig, log=sys.stderr):
        actor = ray.remote(concurrency_groups=CONCURRENCY_GROUPS)(_RewardActor)
        gpus = cfg.model.num_gpus if cfg.model is not None else 0.0
        self.workers = [
            actor.options(
                num_cpus=cfg.num_cpus_per_worker,
                num_gpus=gpus,
                max_restarts=cfg.max_restarts,
                max_task_retries=cfg.max_restarts,
                **actor_options(f"reward-{i}"),
            ).remote(cfg, name=f"reward-{i}")
            for i in range(cfg.num_workers)
        ]
        self.watch = StallWatch(cfg.stall_timeout_s)
        self.log = log

    def scores(self, chunks: list[Chunk], timeout: float, what: str) -> tuple[list[pa.RecordBatch], dict[str, float]]:
        """Every chunk's reward columns, and the scoring seconds summed over chunks (`reward_latency/NAME`)
        with the restarts seen (`restarts/reward`)."""
        self._await(chunks, timeout, what)
        rewards = _get([c.rewards for c in chunks], timeout, what)
        latency: dict[str, float] = {}
        for seconds in _get([c.latency for c in chunks], timeout, what):
            for name, value in seconds.items():
                key = "restarts/reward" if name == RESTARTED else f"reward_latency/{name}"
                latency[key] = latency.get(key, 0.0) + value
        return rewards, latency

    def _await(self, chunks: list[Chunk], timeout: float, what: str) -> None:
        workers = {f"reward-{i}": worker for i, worker in enumerate(self.workers)}

        def kill(name: str) -> None:
            print(
                stalled_message(
                    name,
                    self.watch.timeout_s,
                    "reward.stall_timeout_s",
                    "killing it; restarted, it scores its batches again",
                ),
                file=self.log,
                flush=True,
            )
            ray.kill(workers[name], no_restart=False)

        pending = {c.rewards: f"reward-{c.scorer}" for c in chunks}
        if not wait_watched(pending, workers, self.watch, timeout, kill, what):
            raise PipelineTimeout(f"{what} did not finish within rollout.iteration_timeout_s ({timeout:.0f}s)")

    def shutdown(self) -> None:
        for worker in self.workers:
            ray.kill(worker)


def _get(refs: list[ray.ObjectRef], timeout: float, what: str) -> list:
    try:
        return ray.get(refs, timeout=timeout)
    except ray.exceptions.GetTimeoutError:
        raise PipelineTimeout(f"{what} did not finish within rollout.iteration_timeout_s ({timeout:.0f}s)") from None
