"""The reward workers: `RewardActor`, the Ray edge of a `RewardWorker` (rules and a reward model), and the
group whose members score the chunks a `Launch` hands them, in turn.

A worker whose process dies is restarted by Ray and runs the lost call again there (it holds no state
but its scorers). One that holds a chunk and scores nothing for `reward.stall_timeout_s` is killed so
that Ray restarts it the same way.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import pyarrow as pa
import ray

from contracts.config import RewardConfig
from contracts.console import actor_env
from contracts.errors import first_line
from reward.worker import RESTARTED, RewardWorker
from rollout.actors.group import ActorGroup
from rollout.actors.member import CONCURRENCY_GROUPS, Member
from rollout.runtime.failures import ActorStartError, PipelineTimeout
from rollout.runtime.stall import wait_watched


class RewardActor(Member):
    kind = "reward"

    def __init__(self, cfg: RewardConfig, *, name: str, process_env: dict[str, str]):
        super().__init__(name, process_env, lambda: RewardWorker(cfg, name=name))

    def score_batch(self, batch: pa.RecordBatch, records: list) -> tuple[pa.RecordBatch, dict[str, float]]:
        """The batch's reward columns and the seconds spent (RewardWorker.score_batch); the first call after a
        restart says so in the seconds, for the driver's restart count."""
        rewards, seconds = self.core.score_batch(batch, records)
        if self.restarted:
            seconds, self.restarted = {**seconds, RESTARTED: 1.0}, False
        return rewards, seconds


@dataclass(frozen=True)
class Scoring:
    """A batch's scoring under way (`RewardWorkers.score`)."""

    rewards: ray.ObjectRef  # its reward columns
    latency: ray.ObjectRef  # the scorer's seconds, per rule
    scorer: int  # which reward worker scores it


class RewardWorkers(ActorGroup):
    kind = "reward"
    stall_setting = "reward.stall_timeout_s"
    on_stall = "killing it; restarted, it scores its batches again"

    def __init__(self, cfg: RewardConfig, *, start_timeout_s: float, log=None, name: str = "reward"):
        """`name`: the members' (`NAME-0`, ...), in logs and log files."""
        actor = ray.remote(concurrency_groups=CONCURRENCY_GROUPS)(RewardActor)
        gpus = cfg.model.num_gpus if cfg.model is not None else 0.0
        names = [f"{name}-{i}" for i in range(cfg.num_workers)]
        handles = [
            actor.options(
                num_cpus=cfg.num_cpus_per_worker,
                num_gpus=gpus,
                max_restarts=cfg.max_restarts,
                max_task_retries=cfg.max_restarts,
            ).remote(cfg, name=name, process_env=actor_env(name))
            for name in names
        ]
        super().__init__(names, handles, stall_timeout_s=cfg.stall_timeout_s, max_restarts=cfg.max_restarts, log=log)
        self.start_timeout_s = start_timeout_s
        self.asked = f"{cfg.num_cpus_per_worker} CPU and {gpus} GPU"
        self._turns = itertools.count()  # whose turn it is to score: batches go round the workers

    def wait_started(self) -> None:
        pending = {h.ready.remote(): name for h, name in zip(self.handles, self.names)}
        super().wait_started(pending, self.start_timeout_s, "ray.actor_start_timeout_s", self.asked)

    def score(self, batch: ray.ObjectRef, records: list) -> Scoring:
        """Queue a generation batch's scoring on the next worker in turn; `records`: the data records of its
        prompts, in order."""
        scorer = next(self._turns) % len(self.handles)
        rewards, latency = self.handles[scorer].score_batch.options(num_returns=2).remote(batch, records)
        return Scoring(rewards, latency, scorer)

    def scores(
        self, scorings: list[Scoring], timeout: float, what: str
    ) -> tuple[list[pa.RecordBatch], dict[str, float]]:
        """Every scoring's reward columns, and the scoring seconds summed over them (`reward_latency/NAME`)
        with the restarts seen (`restarts/reward`)."""
        pending = {s.rewards: self.names[s.scorer] for s in scorings}
        if not wait_watched(pending, self.by_name(), self.watch, timeout, self.kill_stalled_member, what):
            raise PipelineTimeout(f"{what} did not finish within rollout.iteration_timeout_s ({timeout:.0f}s)")
        rewards = [self._get(s.rewards, self.names[s.scorer], timeout, what) for s in scorings]
        latency: dict[str, float] = {}
        for scoring in scorings:
            for name, value in self._get(scoring.latency, self.names[scoring.scorer], timeout, what).items():
                key = "restarts/reward" if name == RESTARTED else f"reward_latency/{name}"
                latency[key] = latency.get(key, 0.0) + value
        return rewards, latency

    def _get(self, ref: ray.ObjectRef, name: str, timeout: float, what: str):
        def late():
            return PipelineTimeout(f"{what} did not finish within rollout.iteration_timeout_s ({timeout:.0f}s)")

        try:
            return self.get(ref, name, timeout, late)
        except ray.exceptions.RayActorError as e:  # its restarts spent: Ray gave up on it
            raise ActorStartError(
                f"{name} died and was not restarted (reward.max_restarts {self.max_restarts}): {first_line(e)}; "
                "its log is under RUN_DIR/logs"
            ) from None
