"""The Ray edge of a rollout worker: the actor class the pool spawns, and the error of one that does
not start. Ray names the actor class `_RolloutActor` in its errors and state API (the CLI and the
benchmarks read that name), so the class keeps it."""

from __future__ import annotations

from collections.abc import Iterator

import pyarrow as pa

from contracts.console import route_actor_output
from contracts.errors import JobFailure
from contracts.rendering import PromptTask
from rollout.actors.heap import trim_heap
from rollout.actors.telemetry import announce_if_restarted
from rollout.generation.worker import GenerationSummary, RolloutWorker


class _RolloutActor(RolloutWorker):
    """The Ray edge of a RolloutWorker: a streaming call that yields each chunk's batch, then its summary.

    Both are plain values, so their object-store copies belong to the caller: refs the actor made
    itself and nested in a yield are not reliably kept alive once the actor drops them (seen with
    Ray 2.60: "The object has already been deleted by the reference counting protocol")."""

    def __init__(self, *args, **kwargs):
        route_actor_output()
        super().__init__(*args, **kwargs)
        announce_if_restarted("rollout", self.name)

    def __repr__(self) -> str:  # Ray names the actor by it in its errors and log lines
        return getattr(self, "name", type(self).__name__)  # asked for even when __init__ failed

    def stream(
        self, chunks: list[list[PromptTask]], seeds: list[int | None], *, run_id: str, iteration: int
    ) -> Iterator[pa.RecordBatch | tuple[int, GenerationSummary]]:
        """Each chunk as it completes (in any order): its batch, then (its index, its summary)."""
        for index, batch, summary in self.generate(chunks, seeds, run_id=run_id, iteration=iteration):
            yield batch
            yield index, summary
        trim_heap()


class WorkerStartError(JobFailure):
    """A rollout worker did not start (or restart); the message names it and the resources it asked for."""


RolloutActor = _RolloutActor
