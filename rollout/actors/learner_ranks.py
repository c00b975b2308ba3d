"""The learner's ranks: the group that places its `LearnerRank`s (`learner_rank.py`; created
empty, so rank 0 names the process group's address first), runs every call on every rank (FSDP's
collectives need them all; rank 0's answer is the group's), each wait bounded and naming the rank.

Recovery is the group's own: a rank that died (or was killed for a stall) fails its call; the group builds
new ranks from the restart point its `checkpoints` give (the newest checkpoint, or the start model), counts the
updates lost (`lost_updates`: the job makes them again), keeps the rebuild for the job to record (`rebuilds`),
tells `on_rebuilt`'s listeners (the weight sync) and runs the call again (`learn` on the same samples, reads
on the new ranks), holding `lock` (a collector thread may need the weights); a checkpoint a rank died in is
not retried.

Checkpoints are the driver's: the group saves one when asked and says when its write is done (`written`).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import ray
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from contracts.config import RayConfig
from contracts.console import actor_env
from contracts.device import resolve_device
from contracts.errors import JobFailure, first_line
from learner.checkpoint import NonFiniteError
from learner.samples import LearnerColumns, SampleBatch
from rollout.actors.group import ActorGroup
from rollout.actors.learner_rank import LearnerRank
from rollout.actors.learner_spec import LearnerSpec
from rollout.actors.member import CONCURRENCY_GROUPS
from rollout.runtime.failures import ActorRaised, start_failed
from rollout.runtime.telemetry import record_restart
from rollout.weight_sync.wire import GroupAddress, SyncPlan


class LearnerError(JobFailure):
    """A learner rank could not be placed, failed or did not answer in time; the message names it."""


class RestartPoint(Protocol):
    def restart_point(self) -> Path | None:
        """The checkpoint new ranks load (None: the start model); asked as ranks are lost, before they are
        replaced, so that the checkpoint they were writing is settled first."""


@dataclass(frozen=True)
class Rebuilt:  # a rebuild, as `on_rebuilt`'s listeners and `rebuilds` tell it
    iteration: int  # the iteration it happened in
    resumed_from: dict | None  # the checkpoint the new ranks loaded (its name, iteration, policy version)
    after_update: bool  # the iteration's own update had been made, and went with the lost rank


class LearnerRanks(ActorGroup):
    kind = "learner"
    stall_setting = "learner.stall_timeout_s"
    on_stall = "killing it; the learner is rebuilt from the newest checkpoint"
    restarted_by_ray = False

    def __init__(self, spec: LearnerSpec, ray_cfg: RayConfig, *, checkpoints: RestartPoint | None = None, log=None):
        """`checkpoints`: what a rebuild starts from (without them, the start model)."""
        lc = spec.cfg
        self.spec, self.ray_cfg, self.timeout = spec, ray_cfg, lc.call_timeout_s
        self.checkpoints = checkpoints
        self.iteration = 0  # the iteration being run, for the console and the listeners
        self.updates = 0  # PPO updates the live weights hold: the policy version
        self.lost_updates = 0  # updates lost to rebuilds, all told: the job makes them again
        self.on_rebuilt: list[Callable[[Rebuilt], None]] = []
        self._rebuilds: list[Rebuilt] = []  # since `rebuilds` was last asked
        self._learned_iteration: int | None = None
        self.lock = threading.RLock()
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
        fix = "lower learner.num_ranks or learner.num_cpus_per_rank, or add nodes"
        if rebuilt:
            fix = "add a node; the same command resumes from the newest checkpoint"
        self.place_together(
            f"the learner's {lc.num_ranks} rank(s)", bundle, lc.num_ranks, place_timeout_s, setting, fix
        )
        actor = ray.remote(concurrency_groups=CONCURRENCY_GROUPS)(LearnerRank)
        self.names = [f"learner rank {i}" for i in range(lc.num_ranks)]
        self.handles = [
            actor.options(
                num_cpus=lc.num_cpus_per_rank,
                num_gpus=gpus,
                scheduling_strategy=PlacementGroupSchedulingStrategy(self.placement, i),
            ).remote(actor_env(f"learner-{i}"))
            for i in range(lc.num_ranks)
        ]
        address = self._get(self.handles[0].address.remote(), "learner rank 0")
        try:
            self._finish([h.start.remote(self.spec, i, lc.num_ranks, address) for i, h in enumerate(self.handles)])
        except ActorRaised as e:
            raise start_failed(e.member, e.cause) from None

    # -- the calls, each on every rank -------------------------------------------------------------

    def learn(
        self, iteration: int, batches: list[ray.ObjectRef], rewards: list[ray.ObjectRef], selected=None
    ) -> tuple[ray.ObjectRef, dict[str, float], dict[str, float]]:
        """An iteration's learning: (ref to rank 0's LearnerColumns, stats, stage seconds). A rank lost in
        it costs the updates since the newest checkpoint: the group is rebuilt and learns on these samples."""
        self.iteration = iteration

        def learn():
            pairs = [
                h.learn.options(num_returns=2).remote(batches, rewards, self.timeout, selected) for h in self.handles
            ]
            return self._learned(pairs)

        with self.lock:
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
        pairs = [h.learn_samples.options(num_returns=2).remote(ref) for h in self.handles]
        columns, stats, timings = self._learned(pairs)
        self.updates += 1
        return self._get(columns, "learner rank 0"), stats, timings

    def save(self, directory: Path, extra: dict) -> None:
        """Every rank stages its part of checkpoint `directory` and writes it in the background (`written`).
        A rank that dies first is rebuilt; the checkpoint is not retried."""
        handles = self.handles
        try:
            self._every(lambda h: h.save.remote(directory, extra))
        except ray.exceptions.RayActorError as e:
            self._rebuild(e, handles)

    def written(self, wait: bool) -> float | None:
        """The seconds `save`'s checkpoint took to write, once every rank's part is written; None while one
        writes, or when a rank died first (rebuilt)."""
        handles = self.handles
        refs = [h.written.remote(wait) for h in handles]
        try:
            answers = [self._get(r, n) for r, n in zip(self._finish(refs), self.names)]
        except ray.exceptions.RayActorError as e:
            self._rebuild(e, handles)
            return None
        if any(seconds is None for seconds in answers):
            return None
        return max(answers)

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

    def rebuilds(self) -> list[Rebuilt]:
        """The rebuilds since the last call, oldest first: the job records each as a start of the run."""
        with self.lock:
            rebuilds, self._rebuilds = self._rebuilds, []
        return rebuilds

    # -- recovery ----------------------------------------------------------------------------------

    def _recovering(self, call):
        """`call()`, again on rebuilt ranks for as long as a rank dies in it (learner.max_restarts bounds it)."""
        with self.lock:
            while True:
                handles = self.handles
                try:
                    return call()
                except ray.exceptions.RayActorError as e:
                    self._rebuild(e, handles)

    def _rebuild(self, error: BaseException, failed: list) -> None:
        """New ranks from the newest checkpoint (or the start model), unless the `failed` ranks were replaced
        already (by another thread); LearnerError once restarts are spent."""
        with self.lock:
            if failed is self.handles:
                self._replace(error)

    def _replace(self, error: BaseException) -> None:
        self.restarts += 1
        limit = self.max_restarts
        if self.restarts > limit:
            raise LearnerError(f"a learner rank died again ({first_line(error)}); learner.max_restarts ({limit}) spent")
        checkpoint = self.checkpoints.restart_point() if self.checkpoints is not None else None
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
        self._rebuilds.append(rebuilt)
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
        self._finish([flag for _, flag in pairs])
        return pairs[0][0]

    def _learned(self, pairs) -> tuple[ray.ObjectRef, dict[str, float], dict[str, float]]:
        summaries = self._finish([summary for _, summary in pairs])
        stats, timings = self._get(summaries[0], "learner rank 0")
        return pairs[0][0], stats, timings

    def _finish(self, refs: list[ray.ObjectRef]) -> list[ray.ObjectRef]:
        """Every rank's call done (raising as soon as one fails); the refs, in rank order."""
        self.wait_all(dict(zip(refs, self.names)), self.timeout, self._late)
        return refs

    def _get(self, ref: ray.ObjectRef, name: str):
        return self.get(ref, name, self.timeout, lambda: self._late([name]))

    def _late(self, names: list[str]) -> LearnerError:
        return LearnerError(f"{', '.join(names)} did not answer within learner.call_timeout_s ({self.timeout:.0f}s)")
