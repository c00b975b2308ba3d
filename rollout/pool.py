"""The driver's view of the RolloutWorker actors: spread prompts, collect in completion order, sync weights.

Prompts go out in chunks, each worker holding at most two in flight, and results come back through
`ray.wait` as they finish: a slow worker takes fewer chunks instead of holding the others.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import ray

from learner.device import resolve_device
from rollout.config import JobConfig
from rollout.rendering import PromptTask
from rollout.telemetry import record_queue_depth
from rollout.worker import GenerationResult, RolloutWorker


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
        ray.get([w.ready.remote() for w in self.workers])
        self.version = 0

    def generate(self, tasks: list[PromptTask], *, run_id: str, iteration: int) -> Iterator[GenerationResult]:
        """Yield each chunk's result as soon as it is done, whichever worker finishes first."""
        chunk = max(1, math.ceil(len(tasks) / (len(self.workers) * self.cfg.rollout.chunks_per_worker)))
        chunks = [tasks[i:i + chunk] for i in range(0, len(tasks), chunk)]
        base_seed = self.cfg.rollout.sampling.seed
        in_flight: dict[ray.ObjectRef, int] = {}
        next_chunk = 0

        def submit(worker: int) -> None:
            nonlocal next_chunk
            seed = None if base_seed is None else (base_seed * 1_000_003 + iteration) * 10_007 + next_chunk
            ref = self.workers[worker].generate.remote(chunks[next_chunk], run_id=run_id, iteration=iteration,
                                                       seed=seed)
            in_flight[ref] = worker
            next_chunk += 1

        for _ in range(2):
            for w in range(len(self.workers)):
                if next_chunk < len(chunks):
                    submit(w)
        while in_flight:
            record_queue_depth(len(in_flight))
            [done], _ = ray.wait(list(in_flight), num_returns=1)
            worker = in_flight.pop(done)
            if next_chunk < len(chunks):
                submit(worker)
            yield ray.get(done)

    def sync_weights(self, version: int, weights: list[tuple[str, object]] | ray.ObjectRef) -> None:
        """Every worker serves `version` when this returns; a worker that misses the timeout is named.

        `weights` may already be an ObjectRef (the learner's export): it then goes from the learner
        to the workers through the object store without a copy in the driver.
        """
        ref = weights if isinstance(weights, ray.ObjectRef) else ray.put(weights)
        self._await({w.update_weights.remote(version, ref): name for w, name in zip(self.workers, self.names)},
                    version)

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
