"""What one iteration carries from one step of the job loop to the next (`Session`'s steps)."""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa
import ray

from rollout.actors.launch import Chunk, Launch
from rollout.driver.dynamic_sampling import Selection
from rollout.generation.worker import GenerationSummary


@dataclass
class Launched:
    """An iteration whose generation and scoring are queued."""

    generation: Launch  # its chunks, handed to scorers as they complete
    sampler: dict  # the data cursor after this iteration's prompts
    after_sync: bool  # queued behind a weight sync that collect must confirm
    indices: list[int]  # the prompts' records
    trains_at: int | None = None  # partial rollouts: the policy version that will train the iteration


@dataclass
class Samples:
    """A collected iteration: the batches stay in the object store; summaries and rewards are here."""

    iteration: int
    chunks: list[Chunk]
    rewards: list[pa.RecordBatch]  # one per chunk
    sampler: dict
    latency: dict[str, float]  # reward_latency/NAME: seconds scoring this iteration, in total and per rule
    selection: Selection | None = None  # the rows trained on: dynamic sampling's, less those too stale
    rounds: int = 1  # generation rounds (dynamic sampling)
    dropped_stale: int = 0  # partial rollouts: rows whose first token is older than rollout.max_staleness allows
    carried_over: int = 0  # partial rollouts: groups the workers hold for later iterations

    @property
    def summaries(self) -> list[GenerationSummary]:
        return [c.summary for c in self.chunks]


@dataclass
class Learned:
    columns: ray.ObjectRef  # LearnerColumns, for the archive
    stats: dict[str, float]
