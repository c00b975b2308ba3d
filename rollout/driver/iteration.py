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


@dataclass
class Samples:
    """A collected iteration: the batches stay in the object store; summaries and rewards are here."""

    iteration: int
    chunks: list[Chunk]
    rewards: list[pa.RecordBatch]  # one per chunk
    sampler: dict
    latency: dict[str, float]  # reward_latency/NAME: seconds scoring this iteration, in total and per rule
    selection: Selection | None = None  # dynamic sampling's: the rows trained on
    rounds: int = 1  # generation rounds (dynamic sampling)

    @property
    def summaries(self) -> list[GenerationSummary]:
        return [c.summary for c in self.chunks]


@dataclass
class Learned:
    columns: ray.ObjectRef  # LearnerColumns, for the archive
    stats: dict[str, float]
