"""The learner ranks as Ray actors: one placement group, one process group, every call to every rank.

Each rank is a `Learner` (plain class, `learner/`) inside a thin actor. The actors are created
empty so that rank 0 can name the process group's address before any rank joins it; then all of
them build their `Learner` at once. Calls go to every rank (FSDP's collectives need them all) and
rank 0's answer is the group's. Every wait has a timeout that names the rank it waited on.
"""

from __future__ import annotations

import os
import socket
import sys
import time
from pathlib import Path

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from contracts import storage
from contracts.config import JobConfig
from contracts.console import actor_options, route_actor_output
from contracts.device import resolve_device
from contracts.errors import JobFailure
from learner.samples import LearnerColumns, SampleBatch
from rollout.actors.placement import wait_placed
from rollout.actors.stall import CONCURRENCY_GROUPS, POLL_S, Patience, StallWatch, stalled_message
from rollout.weight_sync.sender import WeightSender
from rollout.weight_sync.wire import GroupAddress, SyncPlan


def job_learner(cfg: JobConfig, model_path: str, **distributed):
    """A `Learner` for this job: its section of the config, and the few values of the others it needs."""
    from learner.learner import Learner

    return Learner(
        cfg.learner,
        model_path,
        dtype=cfg.model.dtype,
        temperature=cfg.rollout.sampling.temperature,
        seed=cfg.seed,
        threads=cpu_threads(cfg),
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


class LearnerError(JobFailure):
    """A learner rank could not be placed, failed or did not answer in time; the message names it."""


class _Rank:
    def __init__(self):
        route_actor_output()
        self.rank = None
        self.learning = False

    def __repr__(self) -> str:  # Ray names the actor by it in its errors and log lines
        return "learner" if self.rank is None else f"learner rank {self.rank}"

    def address(self) -> str:
        """A free port on this node, for the process group rank 0 serves."""
        with socket.socket() as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        return f"{ray.util.get_node_ip_address()}:{port}"

    def start(self, cfg: JobConfig, model_path: str, rank: int, world_size: int, address: str) -> None:
        self.rank = rank
        model_path = storage.fetch(model_path)  # from the run's URI where this node cannot see the driver's disk
        self.learner = job_learner(cfg, model_path, rank=rank, world_size=world_size, address=address)
        self.sender = WeightSender(self.learner)

    def progress(self) -> int | None:
        """Micro-batches done while learning (rollout.actors.stall); None in the other calls, which are
        single library calls (a checkpoint, a gather) whose answer is progress enough."""
        return self.learner.micro_batches_done if self.learning else None

    # Every rank runs each call below (FSDP's collectives need them all); only rank 0's answer travels back.

    def learn(self, batches: list[ray.ObjectRef], rewards: list[ray.ObjectRef], timeout: float):
        """One iteration on the generation and reward batches (fetched here, from the object store):
        (per-token columns, for the archive; (stats, stage seconds), for the driver)."""
        from rollout.archive.columns import sample_batch

        return self.learn_samples(sample_batch(ray.get(batches, timeout=timeout), ray.get(rewards, timeout=timeout)))

    def learn_samples(self, samples: SampleBatch):
        self.learning = True
        try:
            columns, stats, timings = self.learner.learn(samples)
        finally:
            self.learning = False
        return self._answer(columns), (stats, timings)

    def save(self, directory: Path, extra: dict) -> None:
        Path(directory).mkdir(parents=True, exist_ok=True)  # on a node that does not see the driver's disk, too
        self.learner.save(directory, extra)
        storage.publish(directory)  # for a driver that cannot see this node's disk

    def load(self, directory: Path) -> dict:
        storage.fetch(directory)
        return self._answer(self.learner.load(directory))

    def probe_logprobs(self, token_ids: list[int]) -> list[float]:
        return self._answer(self.learner.probe_logprobs(token_ids))

    def export_weights(self):
        """(weights, True): the flag is small, so a caller can wait on it and leave the weights in the store."""
        return self._answer(self.learner.export_weights()), True

    def versioned_weights(self):
        return self._answer(self.learner.versioned_weights()), True

    def weight_plan(self, dtype: str, bucket_bytes: int) -> SyncPlan:
        return self._answer(self.sender.plan(dtype, bucket_bytes))

    def open_weight_group(self, address: GroupAddress) -> bool:
        return self.sender.open(address)

    def broadcast_weights(self, plan: SyncPlan, sync: int) -> bool:
        return self.sender.broadcast(plan, sync)

    def version(self) -> int:
        """Rank 0 alone: no collective."""
        return self.learner.version

    def _answer(self, result):
        return result if self.rank == 0 else None


class LearnerGroup:
    def __init__(self, cfg: JobConfig, model_path: str, *, rebuilt: bool = False):
        """`rebuilt`: after ranks were lost, so placing the new ones waits `ray.node_wait_timeout_s` (for a
        replacement node) rather than the start-up's `ray.actor_start_timeout_s`."""
        lc = cfg.learner
        setting = "ray.node_wait_timeout_s" if rebuilt else "ray.actor_start_timeout_s"
        place_timeout_s = cfg.ray.node_wait_timeout_s if rebuilt else cfg.ray.actor_start_timeout_s
        self.timeout = lc.call_timeout_s
        gpus = 1 if resolve_device(lc.device) == "cuda" else 0
        bundle = {"CPU": lc.num_cpus_per_rank, **({"GPU": gpus} if gpus else {})}
        self.group = placement_group([bundle] * lc.num_ranks, strategy="PACK")
        if wait_placed([self.group.ready()], place_timeout_s, f"the learner's {lc.num_ranks} rank(s)", setting):
            remove_placement_group(self.group)
            fix = (
                "add a node; the same command resumes from the newest checkpoint"
                if rebuilt
                else "lower learner.num_ranks or learner.num_cpus_per_rank, or add nodes"
            )
            raise LearnerError(
                f"the learner's {lc.num_ranks} rank(s) x {bundle} could not be placed within "
                f"{setting} ({place_timeout_s:.0f}s); the cluster has {ray.available_resources()} free: {fix}"
            )
        actor = ray.remote(concurrency_groups=CONCURRENCY_GROUPS)(_Rank)
        self.watch = StallWatch(lc.stall_timeout_s)
        self.ranks = [
            actor.options(
                num_cpus=lc.num_cpus_per_rank,
                num_gpus=gpus,
                **actor_options(f"learner-{i}"),
                scheduling_strategy=PlacementGroupSchedulingStrategy(self.group, i),
            ).remote()
            for i in range(lc.num_ranks)
        ]
        address = self._get(self.ranks[0].address.remote(), "learner rank 0")
        self._finish([r.start.remote(cfg, model_path, i, lc.num_ranks, address) for i, r in enumerate(self.ranks)])

    def learn(
        self, batches: list[ray.ObjectRef], rewards: list[ray.ObjectRef]
    ) -> tuple[ray.ObjectRef, dict[str, float], dict[str, float]]:
        """An iteration's learning: (ref to rank 0's LearnerColumns, stats, stage seconds)."""
        pairs = [r.learn.options(num_returns=2).remote(batches, rewards, self.timeout) for r in self.ranks]
        return self._learned(pairs)

    def learn_samples(self, samples: SampleBatch) -> tuple[LearnerColumns, dict[str, float], dict[str, float]]:
        """`learn` on a batch already assembled (an archive's samples, a test's)."""
        ref = ray.put(samples)
        columns, stats, timings = self._learned(
            [r.learn_samples.options(num_returns=2).remote(ref) for r in self.ranks]
        )
        return self._get(columns, "learner rank 0"), stats, timings

    def save(self, directory: Path, extra: dict) -> None:
        """Every rank writes its part of checkpoint `directory`."""
        self._every(lambda rank: rank.save.remote(directory, extra))

    def load(self, directory: Path) -> dict:
        """Restore every rank from checkpoint `directory`; the job state saved with it."""
        return self._every(lambda rank: rank.load.remote(directory))

    def probe_logprobs(self, token_ids: list[int]) -> list[float]:
        return self._every(lambda rank: rank.probe_logprobs.remote(token_ids))

    def version(self) -> int:
        """The number of updates the weights hold."""
        ref = self.ranks[0].version.remote()
        self._finish([ref])  # watched, as every wait on a rank is
        return self._get(ref, "learner rank 0")

    def weights_ref(self) -> ray.ObjectRef:
        """The policy's weights, left in the object store (the workers fetch them from there)."""
        return self._stored(lambda rank: rank.export_weights.options(num_returns=2).remote())

    def versioned_weights_ref(self) -> ray.ObjectRef:
        """(version, weights) read together, left in the object store, for an engine restarted between syncs."""
        return self._stored(lambda rank: rank.versioned_weights.options(num_returns=2).remote())

    def weight_plan(self, dtype: str, bucket_bytes: int) -> SyncPlan:
        return self._every(lambda rank: rank.weight_plan.remote(dtype, bucket_bytes))

    def open_weight_group(self, address: GroupAddress) -> dict[ray.ObjectRef, str]:
        """Start joining the collective sync's group: each rank's pending answer, by name (rank 0 sends)."""
        return dict(zip((r.open_weight_group.remote(address) for r in self.ranks), self.names()))

    def broadcast_weights(self, plan: SyncPlan, sync: int) -> dict[ray.ObjectRef, str]:
        """Start sync number `sync`: each rank's pending answer, by name."""
        return dict(zip((r.broadcast_weights.remote(plan, sync) for r in self.ranks), self.names()))

    def _every(self, call):
        """`call(rank)` (a remote call) on every rank; rank 0's answer once all have finished."""
        refs = self._finish([call(rank) for rank in self.ranks])
        return self._get(refs[0], "learner rank 0")

    def _stored(self, call) -> ray.ObjectRef:
        """Like `_every` for a call with two returns (answer, flag): rank 0's answer stays in the object
        store. Every rank's flag is read, so a rank that died raises here, not in whoever reads the answer."""
        pairs = [call(rank) for rank in self.ranks]
        flags = self._finish([flag for _, flag in pairs])
        self._get(flags[0], "learner rank 0")
        return pairs[0][0]

    def _learned(self, pairs) -> tuple[ray.ObjectRef, dict[str, float], dict[str, float]]:
        summaries = self._finish([summary for _, summary in pairs])
        stats, timings = self._get(summaries[0], "learner rank 0")
        return pairs[0][0], stats, timings

    def names(self) -> list[str]:
        return [f"learner rank {i}" for i in range(len(self.ranks))]

    def _finish(self, refs: list[ray.ObjectRef]) -> list[ray.ObjectRef]:
        """Wait for every rank, raising as soon as one fails: the others may be blocked in a collective
        with it, and would only give up at the timeout. The other ranks' answers are None."""
        names = dict(zip(refs, self.names()))
        pending, deadline = list(refs), time.monotonic() + self.timeout
        patience = Patience()
        while pending:
            done, pending = ray.wait(pending, num_returns=1, timeout=max(0.0, min(POLL_S, deadline - time.monotonic())))
            if not done:
                if time.monotonic() >= deadline:
                    late = ", ".join(names[r] for r in pending)
                    raise LearnerError(f"{late} did not finish within learner.call_timeout_s ({self.timeout:.0f}s)")
                self._kill_stalled({names[r] for r in pending})
                patience.note(lambda: ", ".join(names[r] for r in pending))
                continue
            if done[0] is not refs[0]:
                self._get(done[0], names[done[0]])
        return refs

    def _kill_stalled(self, busy: set[str]) -> None:
        """A rank that makes no progress is killed: its call then fails as a death does, and the
        driver rebuilds the group from the newest checkpoint."""
        ranks = dict(zip(self.names(), self.ranks))
        for name in self.watch.stalled({name: ranks[name] for name in busy}):
            print(
                stalled_message(
                    name,
                    self.watch.timeout_s,
                    "learner.stall_timeout_s",
                    "killing it; the learner is rebuilt from the newest checkpoint",
                ),
                file=sys.stderr,
                flush=True,
            )
            ray.kill(ranks[name])

    def _get(self, ref: ray.ObjectRef, name: str):
        try:
            return ray.get(ref, timeout=self.timeout)
        except ray.exceptions.GetTimeoutError:
            raise LearnerError(f"{name} did not answer within learner.call_timeout_s ({self.timeout:.0f}s)") from None

    def shutdown(self) -> None:
        for r in self.ranks:
            ray.kill(r)
        remove_placement_group(self.group)
