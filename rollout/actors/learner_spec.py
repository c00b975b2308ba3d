"""What builds a learner rank's `Learner`: the learner's section of the job config, and the few values of
the other sections it needs (model path and dtype, sampling temperature, seed, thread count)."""

from __future__ import annotations

import os
from dataclasses import dataclass

from contracts import storage
from contracts.config import JobConfig, LearnerConfig


@dataclass(frozen=True)
class LearnerSpec:
    """What builds a rank's `Learner`: its config section, and the few values of the job's others it needs."""

    cfg: LearnerConfig
    model_path: str
    dtype: str
    temperature: float
    seed: int
    threads: int
    teacher_path: str | None = None  # learner.teacher's model directory, resolved by the driver

    @classmethod
    def of_job(cls, cfg: JobConfig, model_path: str, teacher_path: str | None = None) -> LearnerSpec:
        """`teacher_path`: `learner.teacher.path` resolved to a model directory (rollout.driver.teacher)."""
        return cls(
            cfg.learner,
            model_path,
            cfg.model.dtype,
            cfg.rollout.sampling.temperature,
            cfg.seed,
            cpu_threads(cfg),
            teacher_path,
        )

    def build(self, **distributed):
        from learner.learner import Learner

        return Learner(
            self.cfg,
            storage.fetch(self.model_path),  # from the run's URI where this node cannot see the driver's disk
            dtype=self.dtype,
            temperature=self.temperature,
            seed=self.seed,
            threads=self.threads,
            teacher_path=None if self.teacher_path is None else storage.fetch(self.teacher_path),
            **distributed,
        )


def cpu_threads(cfg: JobConfig) -> int:
    """Torch threads of one CPU rank (learner.num_threads)."""
    lc = cfg.learner
    if lc.num_threads is not None:
        return lc.num_threads
    reserved = max(1, int(lc.num_cpus_per_rank))
    if cfg.rollout.max_staleness > 0:  # generation runs beside the learner: only what Ray reserved
        return reserved
    # Generation and learning alternate: the cores the idle engines reserved are the learner's too.
    return max(reserved, len(os.sched_getaffinity(0)) // lc.num_ranks)
