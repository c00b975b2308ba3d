"""The driver's view of the RolloutWorker actors: queue an iteration's chunks, sync weights between them.

An iteration's prompts go out at once, in `chunks_per_worker` chunks per worker (more where a chunk
would exceed `max_chunk_prompts`), dealt round robin,
one streaming call per worker: its engine holds all of them, and each chunk comes back as soon as it
is done and goes to a reward worker from a collector thread, so scoring starts while the driver
waits on something else. A weight sync is queued on each worker behind its call: the generation in flight
finishes on the weights it started with, every call queued after the sync uses the new ones, and
nothing is drained. The sync is confirmed (version checked, with a timeout that names the worker)
when the first iteration that needs it is collected.
"""

from __future__ import annotations

import math
import sys
import threading
import time

import ray

from contracts.config import JobConfig
from contracts.console import actor_options
from contracts.device import resolve_device
from contracts.rendering import PromptTask
from rollout.actors.placement import note_waiting, wait_placed
from rollout.actors.stall import CONCURRENCY_GROUPS, NOTE_S, StallWatch, stalled_message, wait_watched
from rollout.actors.telemetry import record_queue_depth
from rollout.generation.actor import RolloutActor, WorkerStartError
from rollout.generation.launch import Launch, Share
from rollout.weight_sync.check import ProbeCheck, WeightSyncError
from rollout.weight_sync.collective import CollectiveSync, SyncFailed
from rollout.weight_sync.path import weight_sync_path


class WorkerPool:
    def __init__(self, cfg: JobConfig, model_path: str, *, wait: bool = True):
        """Spawn the workers; with `wait`, return once every engine is up (else call `wait_started`,
        so the caller starts the learner while the engines load)."""
        self.cfg = cfg
        rollout = cfg.rollout
        gpus = rollout.num_gpus_per_worker if resolve_device(rollout.device) == "cuda" else 0
        actor = ray.remote(concurrency_groups=CONCURRENCY_GROUPS)(RolloutActor)
        self.names = [f"rollout-{i}" for i in range(rollout.num_workers)]
        self.workers = [
            actor.options(
                num_cpus=rollout.num_cpus_per_worker,
                num_gpus=gpus,
                max_restarts=rollout.max_restarts,
                **actor_options(name),
            ).remote(name, model_path, rollout, dtype=cfg.model.dtype, seed=cfg.seed + i)
            for i, name in enumerate(self.names)
        ]
        self._ready = {w.ready.remote(): name for w, name in zip(self.workers, self.names)}
        self._asked = f"{rollout.num_cpus_per_worker} CPU and {gpus} GPU"
        self.version = 0
        self._queued: tuple[int, dict[ray.ObjectRef, str]] | None = None
        self._newest: tuple[int, ray.ObjectRef] | None = None  # the last weights sent: what a restart loads
        self._lock = threading.Lock()  # restarts run on collector threads
        self._restart_lock = threading.Lock()
        self.restarts = 0  # workers found restarted and brought up to date
        self.learner = None  # the LearnerGroup whose weights the workers serve (use_learner)
        self.collective: CollectiveSync | None = None  # rollout.weight_sync resolved to collective
        self.probe = ProbeCheck(cfg.rollout.weight_sync_max_logprob_gap)  # the learner's expect()s go here
        self.watch = StallWatch(rollout.stall_timeout_s)

        if wait:
            self.wait_started()

    def wait_started(self) -> None:
        """Every engine up, or WorkerStartError naming the late ones and what they asked for."""
        ready, timeout = self._ready, self.cfg.ray.actor_start_timeout_s
        late = wait_placed(list(ready), timeout, ", ".join(ready.values()))
        if late:
            raise WorkerStartError(
                f"{', '.join(ready[r] for r in late)} did not start within "
                f"ray.actor_start_timeout_s ({timeout:.0f}s): each needs {self._asked}; "
                f"the cluster has {ray.available_resources()} free"
            )
        ray.get(list(ready), timeout=timeout)  # raises a worker's start-up error

    def use_learner(self, learner) -> None:
        """Serve `learner`'s weights (a LearnerGroup; again after it was rebuilt): `queue_newest` sends
        them by the path rollout.weight_sync names."""
        self.learner = learner
        if self.collective is not None:
            self.collective.members_changed()  # the group forms again around the new rank 0
        elif weight_sync_path(self.cfg) == "collective":
            self.collective = CollectiveSync(self.cfg, self.workers, self.names)

    def submit(
        self,
        tasks: list[PromptTask],
        *,
        run_id: str,
        iteration: int,
        scorers: list | None = None,
        records: dict | None = None,
        timeout: float | None = None,
    ) -> Launch:
        """Queue the iteration's chunks, one streaming call per worker; the Launch collects them and
        sends each to a scorer with the data records (`records`, by prompt id) of its prompts."""
        r = self.cfg.rollout
        size = max(1, min(r.max_chunk_prompts, math.ceil(len(tasks) / (len(self.workers) * r.chunks_per_worker))))
        base_seed = self.cfg.rollout.sampling.seed
        shares: list[tuple[list, list]] = [([], []) for _ in self.workers]
        for n, start in enumerate(range(0, len(tasks), size)):
            chunks, seeds = shares[n % len(self.workers)]
            chunks.append(tasks[start : start + size])
            seeds.append(None if base_seed is None else (base_seed * 1_000_003 + iteration) * 10_007 + n)
        record_queue_depth(sum(len(chunks) for chunks, _ in shares))

        def stream(share: Share) -> ray.ObjectRefGenerator:
            return (
                self.workers[share.worker]
                .stream.options(num_returns="streaming")
                .remote(share.chunks, share.seeds, run_id=run_id, iteration=iteration)
            )

        def restart(share: Share) -> ray.ObjectRefGenerator:
            self.restarted(share.worker)
            self.watch.reset(self.names[share.worker])
            return stream(share)

        streams = {
            stream(share): share
            for share in (Share(i, chunks, seeds) for i, (chunks, seeds) in enumerate(shares) if chunks)
        }
        return Launch(
            streams,
            scorers or [],
            records or {},
            timeout or self.cfg.rollout.iteration_timeout_s,
            f"generation of iteration {iteration}",
            restart,
            self.kill_stalled,
            self.names,
        )

    def kill_stalled(self, busy: set[int]) -> None:
        """Kill the workers among `busy` that made no progress for rollout.stall_timeout_s, as if they
        had died: Ray restarts them and their unfinished chunks are generated again."""
        for name in self.watch.stalled({self.names[i]: self.workers[i] for i in busy}):
            self._kill(name)
            self.watch.reset(name)

    def _kill(self, name: str) -> None:
        print(
            stalled_message(
                name,
                self.watch.timeout_s,
                "rollout.stall_timeout_s",
                "killing it; restarted, it loads the newest weights and redoes its work",
            ),
            file=sys.stderr,
            flush=True,
        )
        ray.kill(self.workers[self.names.index(name)], no_restart=False)

    def restarted(self, index: int) -> None:
        """Worker `index` died: wait for Ray to restart it, then load the newest weights into it.

        Both the collector thread and a weight sync can find the same death: the first one back
        restores the worker, the other finds it serving the newest weights already. WorkerStartError
        when it does not come back (its restarts spent, or no room to place it)."""
        name, worker = self.names[index], self.workers[index]
        timeout = self.cfg.ray.node_wait_timeout_s  # a lost node's worker waits for room on another
        deadline = time.monotonic() + timeout
        next_note = time.monotonic() + NOTE_S
        with self._restart_lock:
            while True:
                try:
                    ray.get(worker.ready.remote(), timeout=max(1.0, deadline - time.monotonic()))
                    break
                except ray.exceptions.ActorUnavailableError:  # restarting: not up yet
                    if time.monotonic() > deadline:
                        raise WorkerStartError(
                            f"{name} died and was not back within ray.node_wait_timeout_s ({timeout:.0f}s): the "
                            f"cluster has {ray.available_resources()} free and it needs {self._asked}"
                        ) from None
                    if time.monotonic() > next_note:
                        waited = timeout - (deadline - time.monotonic())
                        note_waiting(f"{name} (restarting)", waited, timeout, "ray.node_wait_timeout_s")
                        next_note += NOTE_S
                    time.sleep(0.5)
                except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError) as e:
                    raise WorkerStartError(
                        f"{name} died and did not come back (rollout.max_restarts "
                        f"{self.cfg.rollout.max_restarts}; ray.node_wait_timeout_s "
                        f"{timeout:.0f}s): {str(e).strip().splitlines()[0]}"
                    ) from None
            # A fresh engine loads the weights before it takes work: as long as it may take to start.
            sync_timeout = max(self.cfg.rollout.weight_sync_timeout_s, timeout)
            if self.collective is not None:  # the group lost a member: the newest weights come another way
                self.collective.members_changed()
                self.restarts += 1
                print(
                    f"{name}: back after a restart; loading the learner's weights, then generating its lost "
                    "chunks again",
                    file=sys.stderr,
                    flush=True,
                )
                self.probe.check(
                    name,
                    ray.get(worker.load_versioned.remote(self.learner.versioned_weights_ref()), timeout=sync_timeout),
                )
                return
            with self._lock:
                newest = self._newest
            version, weights = newest if newest is not None else (0, None)
            if ray.get(worker.serving_version.remote(), timeout=sync_timeout) == version:
                if newest is None:  # nothing to load: a restart before the first sync
                    self.restarts += 1
                return
            self.restarts += 1
            print(
                f"{name}: back after a restart; loading weights version {version}, then generating its lost "
                "chunks again",
                file=sys.stderr,
                flush=True,
            )
            got = self.probe.check(name, ray.get(worker.update_weights.remote(version, weights), timeout=sync_timeout))
            if got != version:
                raise WeightSyncError(f"{name} reports version {got} after a restart and a sync to {version}")

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
        with self._lock:
            self._newest = (version, ref)
        self._queued = (
            version,
            {w.update_weights.remote(version, ref): name for w, name in zip(self.workers, self.names)},
        )

    def queue_newest(self, version: int) -> None:
        """Queue the learner's weights, which are `version`, on every worker behind the chunks it holds:
        broadcast over the collective group, or exported to the object store; `confirm_weights` checks it."""
        if self.collective is None:
            self.queue_weights(version, self.learner.weights_ref())
            return
        self.confirm_weights()
        self.collective.queue(version, self.learner)
        self._queued = (version, None)

    def has_queued_weights(self) -> bool:
        return self._queued is not None

    def confirm_weights(self) -> None:
        """Wait for the queued sync, if any (it runs after the chunks queued before it)."""
        if self._queued is None:
            return
        version, pending = self._queued
        self._queued = None
        self.probe.start()
        if pending is not None:
            self._await(pending, version)
            return
        try:
            served = self.collective.confirm()
        except SyncFailed as e:
            if not e.broken or self.cfg.rollout.max_restarts == 0:
                raise
            # Half-loaded engines must not serve: restarted, they load the learner's weights.
            print(
                f"{e}; restarting {', '.join(e.broken)} (rollout.max_restarts), whose engines were part-way "
                "through loading",
                file=sys.stderr,
                flush=True,
            )
            for name in e.broken:
                ray.kill(self.workers[self.names.index(name)], no_restart=False)
            served = None
        if served is not None:
            for name, result in served.items():
                if self.probe.check(name, result) != version:
                    raise WeightSyncError(f"{name} reports version {result.version} after a sync to {version}")
            self.version = version
        else:  # called off because the group lost a member: every worker loads the learner's weights instead
            pair = self.learner.versioned_weights_ref()
            self.version = min(
                self._await({w.load_versioned.remote(pair): name for w, name in zip(self.workers, self.names)}, None)
            )

    def _await(self, pending: dict[ray.ObjectRef, str], version: int | None) -> list[int]:
        """Wait for each worker's load; `version`: the one each must report (None: any). The versions
        reported (a worker restarted on the way reports its own)."""
        timeout = self.cfg.rollout.weight_sync_timeout_s
        # A stopped worker is killed at its stall timeout (restarted, it loads the newest weights)
        # rather than waited on for the whole sync timeout.
        wait_watched(
            pending,
            dict(zip(self.names, self.workers)),
            self.watch,
            timeout,
            self._kill,
            f"the weight sync to version {version}",
        )
        done, late = ray.wait(list(pending), num_returns=len(pending), timeout=0)
        versions = []
        for r in late:  # stuck, or busier than the timeout allows: restarted, it loads the newest weights
            print(
                f"{pending[r]}: no answer to the weight sync to version {version} within "
                f"rollout.weight_sync_timeout_s ({timeout:g}s); restarting it",
                file=sys.stderr,
                flush=True,
            )
            index = self.names.index(pending[r])
            ray.kill(self.workers[index], no_restart=False)
            versions.append(self._restored(index))
        for r in done:
            try:
                got = self.probe.check(pending[r], ray.get(r))
            except ray.exceptions.RayTaskError:  # its code raised: the same weights fail the same way again
                raise
            except ray.exceptions.RayActorError:  # it died: restarted, it loads the newest weights
                versions.append(self._restored(self.names.index(pending[r])))
                continue
            if version is not None and got != version:
                raise WeightSyncError(f"{pending[r]} reports version {got} after a sync to {version}")
            versions.append(got)
        if version is not None:
            self.version = version
        return versions

    def _restored(self, index: int) -> int:
        """Worker `index` back from a restart with the newest weights: the version it serves."""
        self.restarted(index)
        return ray.get(self.workers[index].serving_version.remote(), timeout=self.cfg.rollout.weight_sync_timeout_s)

    def shutdown(self) -> None:
        for w in self.workers:
            ray.kill(w)
