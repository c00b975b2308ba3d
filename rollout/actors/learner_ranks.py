"""The learner's ranks: `LearnerRank`, the Ray edge of one `Learner`, and the group that places them, runs
every call on every rank, and rebuilds them from the newest checkpoint when one is lost.

The ranks are created empty so that rank 0 can name the process group's address before any rank joins
it; then all of them build their `Learner` at once. Calls go to every rank (FSDP's collectives need them
all) and rank 0's answer is the group's. Every wait has a timeout that names the rank it waited on.

Recovery is the group's own: a rank whose process died (or was killed for a stall) fails the call it
was in; the group then builds new ranks from `restart_from` (the newest checkpoint, or the start model),
counts the updates lost since it (`lost_updates`, which the job makes again on later iterations), tells
`on_rebuilt`'s listeners, and runs the call again: `learn` on the same samples, reads (weights, probes)
on the new ranks. A checkpoint a rank died in is not retried (`save` says False).
"""

from __future__ import annotations

import shutil
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from contracts import storage
from contracts.config import RayConfig
from contracts.console import actor_options
from contracts.device import resolve_device
from contracts.errors import JobFailure
from learner.checkpoint import NonFiniteError
from learner.samples import LearnerColumns, SampleBatch
from rollout.actors.group import ActorGroup
from rollout.actors.learner_spec import LearnerSpec
from rollout.actors.member import CONCURRENCY_GROUPS, Member
from rollout.runtime.failures import ActorRaised, ActorStartError, first_line
from rollout.runtime.placement import free_resources, wait_placed
from rollout.runtime.stall import POLL_S, Patience
from rollout.runtime.telemetry import record_restart
from rollout.weight_sync.sender import WeightSender
from rollout.weight_sync.wire import GroupAddress, SyncPlan


class LearnerError(JobFailure):
    """A learner rank could not be placed, failed or did not answer in time; the message names it."""


class LearnerRank(Member):
    kind = "learner"

    def __init__(self):
        super().__init__("learner")
        self.rank: int | None = None
        self.learning = False

    def address(self) -> str:
        """A free port on this node, for the process group rank 0 serves."""
        with socket.socket() as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        return f"{ray.util.get_node_ip_address()}:{port}"

    def start(self, spec: LearnerSpec, rank: int, world_size: int, address: str) -> None:
        self.rank, self.name = rank, f"learner rank {rank}"
        self.build(lambda: spec.build(rank=rank, world_size=world_size, address=address))
        self.sender = WeightSender(self.core)

    def progress(self) -> int | None:
        """Micro-batches done while learning; None in the other calls, which are single library calls (a
        checkpoint, a gather) whose answer is progress enough."""
        return self.core.micro_batches_done if self.learning else None

    # Every rank runs each call below (FSDP's collectives need them all); only rank 0's answer travels back.

    def learn(self, batches: list[ray.ObjectRef], rewards: list[ray.ObjectRef], timeout: float):
        """One iteration on the generation and reward batches (fetched here, from the object store):
        (per-token columns, for the archive; (stats, stage seconds), for the driver)."""
        from rollout.archive.columns import sample_batch

        return self.learn_samples(sample_batch(ray.get(batches, timeout=timeout), ray.get(rewards, timeout=timeout)))

    def learn_samples(self, samples: SampleBatch):
        """`learn` on a batch already assembled (an archive's samples, a test's)."""
        self.learning = True
        try:
            columns, stats, timings = self.core.learn(samples)
        finally:
            self.learning = False
        return self._answer(columns), (stats, timings)

    def save(self, directory: Path, extra: dict) -> None:
        Path(directory).mkdir(parents=True, exist_ok=True)  # on a node that does not see the driver's disk, too
        self.core.save(directory, extra)
        storage.publish(directory)  # for a driver that cannot see this node's disk

    def load(self, directory: Path) -> dict:
        storage.fetch(directory)
        return self._answer(self.core.load(directory))

    def probe_logprobs(self, token_ids: list[int]) -> list[float]:
        return self._answer(self.core.probe_logprobs(token_ids))

    def export_weights(self):
        """(weights, True): the flag is small, so a caller can wait on it and leave the weights in the store."""
        return self._answer(self.core.export_weights()), True

    def versioned_weights(self):
        return self._answer(self.core.versioned_weights()), True

    def weight_plan(self, dtype: str, bucket_bytes: int) -> SyncPlan:
        return self._answer(self.sender.plan(dtype, bucket_bytes))

    def open_weight_group(self, address: GroupAddress) -> bool:
        return self.sender.open(address)

    def broadcast_weights(self, plan: SyncPlan, sync: int) -> bool:
        return self.sender.broadcast(plan, sync)

    def version(self) -> int:
        """Rank 0 alone: no collective."""
        return self.core.version

    def _answer(self, result):
        return result if self.rank == 0 else None


@dataclass(frozen=True)
class Rebuilt:
    """A rebuild, as `on_rebuilt`'s listeners hear of it."""

    iteration: int  # the iteration it happened in
    resumed_from: dict | None  # the checkpoint the new ranks loaded (its name, iteration, policy version)
    after_update: bool  # the iteration's own update had been made, and went with the lost rank


class LearnerRanks(ActorGroup):
    kind = "learner"
    stall_setting = "learner.stall_timeout_s"
    on_stall = "killing it; the learner is rebuilt from the newest checkpoint"
    restarted_by_ray = False

    def __init__(self, spec: LearnerSpec, ray_cfg: RayConfig, *, restart_from: Path | None = None, log=None):
        lc = spec.cfg
        self.spec, self.ray_cfg, self.timeout = spec, ray_cfg, lc.call_timeout_s
        self.restart_from = restart_from  # what a rebuild starts from: the newest committed checkpoint
        self.iteration = 0  # the iteration being run, for the console and the listeners
        self.updates = 0  # PPO updates the live weights hold: the policy version
        self.lost_updates = 0  # updates lost to rebuilds, all told: the job makes them again
        self.on_rebuilt: list[Callable[[Rebuilt], None]] = []
        self._learned_iteration: int | None = None
        super().__init__([], [], stall_timeout_s=lc.stall_timeout_s, max_restarts=lc.max_restarts, log=log)
        self._start(rebuilt=False)

    def _start(self, *, rebuilt: bool) -> None:
        """Place the ranks and build their learners. `rebuilt`: after ranks were lost, so placing the new
        ones waits `ray.node_wait_timeout_s` (for a replacement node) rather than the start-up's timeout."""
        lc = self.spec.cfg
        setting = "ray.node_wait_timeout_s" if rebuilt else "ray.actor_start_timeout_s"
        place_timeout_s = self.ray_cfg.node_wait_timeout_s if rebuilt else self.ray_cfg.actor_start_timeout_s
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
                f"{setting} ({place_timeout_s:.0f}s); the cluster has {free_resources()} free: {fix}"
            )
        actor = ray.remote(concurrency_groups=CONCURRENCY_GROUPS)(LearnerRank)
        self.names = [f"learner rank {i}" for i in range(lc.num_ranks)]
        self.handles = [
            actor.options(
                num_cpus=lc.num_cpus_per_rank,
                num_gpus=gpus,
                **actor_options(f"learner-{i}"),
                scheduling_strategy=PlacementGroupSchedulingStrategy(self.group, i),
            ).remote()
            for i in range(lc.num_ranks)
        ]
        address = self._get(self.handles[0].address.remote(), "learner rank 0")
        try:
            self._finish([h.start.remote(self.spec, i, lc.num_ranks, address) for i, h in enumerate(self.handles)])
        except ActorRaised as e:
            raise ActorStartError(
                f"{e.member} failed in its start-up: {type(e.cause).__name__}: {first_line(e.cause)}; "
                "its log is under RUN_DIR/logs"
            ) from None

    # -- the calls, each on every rank -------------------------------------------------------------

    def learn(
        self, iteration: int, batches: list[ray.ObjectRef], rewards: list[ray.ObjectRef]
    ) -> tuple[ray.ObjectRef, dict[str, float], dict[str, float]]:
        """An iteration's learning: (ref to rank 0's LearnerColumns, stats, stage seconds). A rank lost in
        it costs the updates since the newest checkpoint: the group is rebuilt and learns on these samples."""
        self.iteration = iteration

        def learn():
            pairs = [h.learn.options(num_returns=2).remote(batches, rewards, self.timeout) for h in self.handles]
            return self._learned(pairs)

        try:
            result = self._recovering(learn)
        except ActorRaised as e:
            if isinstance(e.cause, NonFiniteError):  # the learner cannot say which iteration it was
                raise NonFiniteError(f"iteration {iteration}: {e.cause}") from None
            raise
        self.updates += 1
        self._learned_iteration = iteration
        return result

    def learn_samples(self, samples: SampleBatch) -> tuple[LearnerColumns, dict[str, float], dict[str, float]]:
        """`learn` on a batch already assembled (an archive's samples, a test's); no recovery."""
        ref = ray.put(samples)
        columns, stats, timings = self._learned(
            [h.learn_samples.options(num_returns=2).remote(ref) for h in self.handles]
        )
        self.updates += 1
        return self._get(columns, "learner rank 0"), stats, timings

    def save(self, directory: Path, extra: dict) -> bool:
        """Every rank writes its part of checkpoint `directory`; False when a rank died in it (the group
        was rebuilt, the partial checkpoint removed)."""
        try:
            self._every(lambda h: h.save.remote(directory, extra))
            return True
        except ray.exceptions.RayActorError as e:
            shutil.rmtree(directory, ignore_errors=True)
            self._rebuild(e)
            return False

    def load(self, directory: Path) -> dict:
        """Restore every rank from checkpoint `directory`; the job state saved with it."""
        extra = self._every(lambda h: h.load.remote(directory))
        self.updates = self._every(lambda h: h.version.remote())
        return extra

    def probe_logprobs(self, token_ids: list[int]) -> list[float]:
        return self._recovering(lambda: self._every(lambda h: h.probe_logprobs.remote(token_ids)))

    def weights_ref(self) -> ray.ObjectRef:
        """The policy's weights, left in the object store (the workers fetch them from there)."""
        return self._recovering(lambda: self._stored(lambda h: h.export_weights.options(num_returns=2).remote()))

    def versioned_weights_ref(self) -> ray.ObjectRef:
        """(version, weights) read together, left in the object store, for an engine that loads them whole."""
        return self._recovering(lambda: self._stored(lambda h: h.versioned_weights.options(num_returns=2).remote()))

    def weight_plan(self, dtype: str, bucket_bytes: int) -> SyncPlan:
        return self._recovering(lambda: self._every(lambda h: h.weight_plan.remote(dtype, bucket_bytes)))

    def open_weight_group(self, address: GroupAddress) -> dict[ray.ObjectRef, str]:
        """Start joining the collective sync's group: each rank's pending answer, by name (rank 0 sends)."""
        return dict(zip((h.open_weight_group.remote(address) for h in self.handles), self.names))

    def broadcast_weights(self, plan: SyncPlan, sync: int) -> dict[ray.ObjectRef, str]:
        """Start sync number `sync`: each rank's pending answer, by name."""
        return dict(zip((h.broadcast_weights.remote(plan, sync) for h in self.handles), self.names))

    # -- recovery ----------------------------------------------------------------------------------

    def _recovering(self, call):
        """`call()`, again on rebuilt ranks for as long as a rank dies in it (learner.max_restarts bounds it)."""
        while True:
            try:
                return call()
            except ray.exceptions.RayActorError as e:
                self._rebuild(e)

    def _rebuild(self, error: BaseException) -> None:
        """New ranks from the newest checkpoint (or the start model); LearnerError once restarts are spent."""
        self.restarts += 1
        limit = self.max_restarts
        if self.restarts > limit:
            raise LearnerError(f"a learner rank died again ({first_line(error)}); learner.max_restarts ({limit}) spent")
        checkpoint = self.restart_from
        print(
            f"learner: a rank died in iteration {self.iteration} ({first_line(error)}); rebuilding it from "
            f"{checkpoint.name if checkpoint else 'the start model'} (restart {self.restarts} of {limit})",
            file=self.log,
            flush=True,
        )
        record_restart("learner")
        self.release()
        self._start(rebuilt=True)
        before, resumed_from = self.updates, None
        self.updates = 0
        if checkpoint:
            extra = self.load(checkpoint)
            resumed_from = {
                "checkpoint": checkpoint.name,
                "iteration": extra["iteration"],
                "policy_version": self.updates,
            }
        self.lost_updates += before - self.updates
        rebuilt = Rebuilt(self.iteration, resumed_from, after_update=self._learned_iteration == self.iteration)
        for listener in self.on_rebuilt:
            listener(rebuilt)

    # -- waiting on the ranks ----------------------------------------------------------------------

    def _every(self, call):
        """`call(handle)` (a remote call) on every rank; rank 0's answer once all have finished."""
        refs = self._finish([call(h) for h in self.handles])
        return self._get(refs[0], "learner rank 0")

    def _stored(self, call) -> ray.ObjectRef:
        """Like `_every` for a call with two returns (answer, flag): rank 0's answer stays in the object
        store. Every rank's flag is read, so a rank that died raises here, not in whoever reads the answer."""
        pairs = [call(h) for h in self.handles]
        flags = self._finish([flag for _, flag in pairs])
        self._get(flags[0], "learner rank 0")
        return pairs[0][0]

    def _learned(self, pairs) -> tuple[ray.ObjectRef, dict[str, float], dict[str, float]]:
        summaries = self._finish([summary for _, summary in pairs])
        stats, timings = self._get(summaries[0], "learner rank 0")
        return pairs[0][0], stats, timings

    def _finish(self, refs: list[ray.ObjectRef]) -> list[ray.ObjectRef]:
        """Wait for every rank, raising as soon as one fails: the others may be blocked in a collective
        with it, and would only give up at the timeout."""
        names = dict(zip(refs, self.names))
        pending, patience = list(refs), Patience()
        deadline = time.monotonic() + self.timeout
        while pending:
            left = deadline - time.monotonic()
            done, pending = ray.wait(pending, num_returns=1, timeout=max(0.0, min(POLL_S, left)))
            if not done:
                if left <= 0:
                    late = ", ".join(names[r] for r in pending)
                    raise LearnerError(f"{late} did not finish within learner.call_timeout_s ({self.timeout:.0f}s)")
                self.kill_stalled(names[r] for r in pending)
                patience.note(lambda: ", ".join(names[r] for r in pending))
                continue
            if done[0] is not refs[0]:
                self._get(done[0], names[done[0]])
        return refs

    def _get(self, ref: ray.ObjectRef, name: str):
        def late():
            return LearnerError(f"{name} did not answer within learner.call_timeout_s ({self.timeout:.0f}s)")

        return self.get(ref, name, self.timeout, late)

    def release(self) -> None:
        super().release()
        remove_placement_group(self.group)
