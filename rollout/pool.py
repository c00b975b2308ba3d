"""The driver's view of the RolloutWorker actors: queue an iteration's chunks, sync weights between them.

An iteration's prompts go out at once, in `chunks_per_worker` chunks per worker, dealt round robin:
each worker's engine finds its next chunk already queued, so it never waits on the driver between
chunks. A weight sync is queued the same way, behind the chunks already there: the generation in
flight finishes on the weights it started with, every chunk queued after the sync uses the new
ones, and nothing is drained. The sync is confirmed (version checked, with a timeout that names
the worker) when the first chunk that needs it is collected.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import ray

from learner.device import resolve_device
from rollout.config import JobConfig
from rollout.rendering import PromptTask
from rollout.telemetry import record_queue_depth
from rollout.worker import RolloutWorker


@dataclass
class Chunk:
    batch: ray.ObjectRef    # the generation batch (Arrow), for the reward workers, the learner and the archive
    summary: ray.ObjectRef  # its GenerationSummary, for the driver
    worker: str


class WorkerStartError(RuntimeError):
    """A rollout worker did not start; the message names it and the resources it asked for."""


class WeightSyncError(RuntimeError):
    """A worker did not confirm a weight update in time; the message names it."""


class WorkerPool:
    def __init__(self, cfg: JobConfig, model_path: str):
        self.cfg = cfg
        rollout = cfg.rollout
        gpus = rollout.num_gpus_per_worker if resolve_device(rollout.device) == "cuda" else 0
        actor = ray.remote(RolloutWorker).options(num_cpus=rollout.num_cpus_per_worker, num_gpus=gpus)
        self.names = [f"rollout-{i}" for i in range(rollout.num_workers)]
        self.workers = [
            actor.remote(name, model_path, rollout, dtype=cfg.model.dtype, seed=cfg.seed + i)
            for i, name in enumerate(self.names)
        ]
        ready = {w.ready.remote(): name for w, name in zip(self.workers, self.names)}
        timeout = cfg.ray.actor_start_timeout_s
        _, late = ray.wait(list(ready), num_returns=len(ready), timeout=timeout)
        if late:
            raise WorkerStartError(f"{', '.join(ready[r] for r in late)} did not start within "
                                   f"ray.actor_start_timeout_s ({timeout:.0f}s): each needs "
                                   f"{rollout.num_cpus_per_worker} CPU and {gpus} GPU; the cluster has "
                                   f"{ray.available_resources()} free")
        ray.get(list(ready), timeout=timeout)  # raises a worker's start-up error
        self.version = 0
        self._queued: tuple[int, dict[ray.ObjectRef, str]] | None = None

    def submit(self, tasks: list[PromptTask], *, run_id: str, iteration: int) -> list[Chunk]:
        """Queue the iteration's chunks on the workers; each chunk's batch and summary come back as refs."""
        chunk = max(1, math.ceil(len(tasks) / (len(self.workers) * self.cfg.rollout.chunks_per_worker)))
        base_seed = self.cfg.rollout.sampling.seed
        chunks = []
        for n, start in enumerate(range(0, len(tasks), chunk)):
            seed = None if base_seed is None else (base_seed * 1_000_003 + iteration) * 10_007 + n
            w = n % len(self.workers)
            batch, summary = self.workers[w].generate.options(num_returns=2).remote(
                tasks[start:start + chunk], run_id=run_id, iteration=iteration, seed=seed)
            chunks.append(Chunk(batch, summary, self.names[w]))
        record_queue_depth(len(chunks))
        return chunks

    def sync_weights(self, version: int, weights: list[tuple[str, object]] | ray.ObjectRef) -> None:
        """Every worker serves `version` when this returns; a worker that misses the timeout is named."""
        self.queue_weights(version, weights)
        self.confirm_weights()

    def queue_weights(self, version: int, weights: list[tuple[str, object]] | ray.ObjectRef) -> None:
        """Queue `version` on every worker behind the chunks it already holds; `confirm_weights` checks it.

        `weights` may already be an ObjectRef (the learner's export): it then goes from the learner
        to the workers through the object store without a copy in the driver.
        """
        self.confirm_weights()  # one sync in flight at a time: each is confirmed before the next
        ref = weights if isinstance(weights, ray.ObjectRef) else ray.put(weights)
        self._queued = (version, {w.update_weights.remote(version, ref): name
                                  for w, name in zip(self.workers, self.names)})

    def has_queued_weights(self) -> bool:
        return self._queued is not None

    def confirm_weights(self) -> None:
        """Wait for the queued sync, if any (it runs after the chunks queued before it)."""
        if self._queued is not None:
            version, pending = self._queued
            self._queued = None
            self._await(pending, version)

    def sync_weights_nccl(self, version: int, learner) -> None:
        """GPU clusters: learner rank 0 broadcasts over NCCL while every worker receives.

        `learner` is the `LearnerGroup`; every rank takes part, since gathering the weights from their
        shards is itself a collective."""
        if not hasattr(self, "_specs"):
            world = 1 + len(self.workers)
            host, port = learner.rank0("weight_group_address")
            joins = dict(zip(learner.submit("open_weight_group", host, port, world), learner.names()))
            joins.update({w.init_weight_group.remote(host, port, i + 1, world): name
                          for i, (w, name) in enumerate(zip(self.workers, self.names))})
            self._await(joins, None)
            self._specs = learner.call("weight_specs")
        refs = {w.receive_weights.remote(version, self._specs): name for w, name in zip(self.workers, self.names)}
        refs.update(zip(learner.submit("broadcast_weights"), learner.names()))
        self._await(refs, None)
        self.version = version

    def _await(self, pending: dict[ray.ObjectRef, str], version: int | None) -> None:
        timeout = self.cfg.rollout.weight_sync_timeout_s
        done, late = ray.wait(list(pending), num_returns=len(pending), timeout=timeout)
        if late:
            names = ", ".join(pending[r] for r in late)
            raise WeightSyncError(f"weight sync to version {version} timed out after {timeout:.0f}s on {names}")
        for r in done:
            got = ray.get(r)
            if version is not None and got != version:
                raise WeightSyncError(f"{pending[r]} reports version {got} after a sync to {version}")
        if version is not None:
            self.version = version

    def shutdown(self) -> None:
        for w in self.workers:
            ray.kill(w)
