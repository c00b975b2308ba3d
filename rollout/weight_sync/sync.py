"""Weight sync as one object: the learner's weights reach every engine by version, over either path.

`queue()` sends the live learner's weights, with their version, behind the generation each worker already
holds: exported through the object store (each worker fetches and reloads them), or broadcast over the
collective group (`collective.py`), as `rollout.weight_sync` chooses (`path.py`). The generation in flight
finishes on the weights it started with; every call queued after the sync uses the new ones; nothing is
drained. `confirm()` waits for it with `rollout.weight_sync_timeout_s`, checks each engine's probe
logprobs against the learner's (`check.py`), and falls back where the collective path cannot finish:
engines left half-loaded are restarted, and every engine loads the learner's weights through the object
store, with the version read alongside them. One sync is in flight at a time.

The groups are the caller's: `workers` a `RolloutWorkers` (whose revived members this object brings up
to date, `restore`), `learner` a `LearnerRanks` (whose rebuilds it follows), or None where every sync's
weights are given (`queue_weights`: tests, benchmarks).
"""

from __future__ import annotations

import sys
import threading

import ray

from contracts.config import RolloutConfig
from rollout.runtime.failures import ActorRaised
from rollout.runtime.stall import wait_watched
from rollout.weight_sync.check import PROBE_IDS, ProbeCheck, Served, WeightSyncError
from rollout.weight_sync.collective import CollectiveSync, SyncFailed


class WeightSync:
    def __init__(self, cfg: RolloutConfig, path: str, *, dtype: str, workers, learner, node_wait_timeout_s: float):
        """`path`: "object_store" or "collective" (`path.weight_sync_path`); `dtype`: the engines'."""
        self.cfg, self.workers, self.learner = cfg, workers, learner
        self.timeout_s = cfg.weight_sync_timeout_s
        # A revived engine loads the weights before it takes work: as long as it may take to start.
        self.restore_timeout_s = max(cfg.weight_sync_timeout_s, node_wait_timeout_s)
        self.probe = ProbeCheck(cfg.weight_sync_max_logprob_gap)
        self.collective = CollectiveSync(cfg, dtype, workers.handles, workers.names) if path == "collective" else None
        self.version = 0  # what every engine serves, as of the last sync confirmed
        self._queued: tuple[int, dict[ray.ObjectRef, str] | None] | None = None
        self._newest: tuple[int, ray.ObjectRef] | None = None  # the last weights sent: what a revived worker loads
        self._synced = False  # a sync was queued: a worker revived since must not keep its start weights
        self._dropped: list[ray.ObjectRef] = []  # loads of a sync from a learner since lost, not waited for
        # Learner rebuilds heard of, moved with `_newest` under the lock (the learner's own count moves as a
        # rebuild starts, before `_newest` is cleared): a version names other weights after each.
        self._epoch = 0
        self._lock = threading.Lock()  # `restore` runs on collector threads
        self._syncing = False
        workers.on_revived = self.restore
        if learner is not None:
            learner.on_rebuilt.append(self._learner_rebuilt)

    @property
    def gap(self) -> float | None:
        """The largest probe-logprob gap of the last sync confirmed (engines vs the learner)."""
        return self.probe.gap

    def queued(self) -> bool:
        return self._queued is not None

    def queue(self) -> None:
        """Queue the live learner's weights, at their version, on every worker behind the chunks it holds."""
        self.confirm()  # one sync in flight at a time: each is confirmed before the next
        self._syncing = True
        try:
            while True:
                epoch = self._epoch
                probe = self.learner.probe_logprobs(list(PROBE_IDS))
                version = self.learner.updates  # read after the probe: a rank lost in it leaves rebuilt ranks' weights
                if self.collective is not None:
                    self.probe.expect(version, probe)
                    self.collective.queue(version, self.learner)
                    self._queued = (version, None)
                    return
                weights = self.learner.weights_ref()
                # A rank lost in the export: the probe and version were the lost ranks'; read all three again.
                if self._epoch == epoch:
                    break
            self.probe.expect(version, probe)
            self.queue_weights(version, weights)
        finally:
            self._syncing = False

    def queue_weights(self, version: int, weights: list[tuple[str, object]] | ray.ObjectRef) -> None:
        """Queue `version` (given weights, or an ObjectRef of the learner's export, which then goes from the
        learner to the workers without a copy in the driver) through the object store."""
        ref = weights if isinstance(weights, ray.ObjectRef) else ray.put(weights)
        with self._lock:
            self._newest = (version, ref)
            self._synced = True
        self._queued = (version, {h.update_weights.remote(version, ref): n for h, n in self._members()})

    def confirm(self) -> int:
        """Wait for the queued sync, if any (it runs after the chunks queued before it); the version every
        engine serves."""
        self._discard_dropped()
        if self._queued is None:
            return self.version
        version, pending = self._queued
        self._queued = None
        self.probe.start()
        self._syncing = True
        try:
            if pending is not None:
                self._await(pending, version)
            else:
                self._confirm_collective(version)
        finally:
            self._syncing = False
        return self.version

    def restore(self, name: str) -> bool:
        """Worker `name` came back from a restart: load the newest weights into it. False when it serves them
        already (the collector thread and a sync may both find the same death: the first one back restores it)."""
        while True:
            with self._lock:
                epoch = self._epoch
            restored = self._restore(name, epoch)
            with self._lock:
                # A learner rebuilt while the worker came up and loaded (a node lost takes both): the weights it
                # loaded were the lost ranks', whose version numbers the new ranks reuse. It loads again.
                if self._epoch == epoch:
                    return restored

    def _restore(self, name: str, epoch: int) -> bool:
        handle = self.workers.handle(name)
        with self._lock:
            newest, synced = self._newest, self._synced
        # The collective group lost a member; or the learner was rebuilt since the last weights were sent, which
        # may be gone with it: either way the learner's own weights, read with their version, come another way.
        if self.collective is not None or (newest is None and synced and self.learner is not None):
            if self.collective is not None:
                self.collective.members_changed()
            _say(f"{name}: back after a restart; loading the learner's weights, then generating its lost chunks again")
            return self._load_learners(name, epoch)
        version, weights = newest if newest is not None else (0, None)
        if self.workers.serving(name, self.restore_timeout_s) == version:
            return newest is None  # nothing to load: a restart before the first sync
        _say(f"{name}: back after a restart; loading weights version {version}, then generating its lost chunks again")
        try:
            served = ray.get(handle.update_weights.remote(version, weights), timeout=self.restore_timeout_s)
        except ray.exceptions.RayError as e:
            if self.learner is None or not _object_lost(e):
                raise
            # The weights were in the object store of a node since lost, with the learner rank that made them.
            _say(f"{name}: weights version {version} were lost with their node; loading the learner's")
            return self._load_learners(name, epoch)
        if self._check_restored(name, served, epoch) not in (None, version):
            raise WeightSyncError(f"{name} reports version {served.version} after a restart and a sync to {version}")
        return True

    def _load_learners(self, name: str, epoch: int) -> bool:
        """The learner's own weights, read with their version, into `name` (the learner rebuilt first if it was
        lost, in which case `restore` loads again)."""
        pair = self.learner.versioned_weights_ref()
        served = ray.get(self.workers.handle(name).load_versioned.remote(pair), timeout=self.restore_timeout_s)
        self._check_restored(name, served, epoch)
        return True

    def _check_restored(self, name: str, served: Served, epoch: int) -> int | None:
        """The version `name` serves, checked against the learner's probe; None where the learner was rebuilt
        since `epoch` (`restore` loads again: the new ranks' probe says nothing of the lost ranks' weights)."""
        with self._lock:
            return self.probe.check(name, served) if self._epoch == epoch else None

    # -- the two paths' confirmations --------------------------------------------------------------

    def _confirm_collective(self, version: int) -> None:
        try:
            served = self.collective.confirm()
        except SyncFailed as e:
            if not e.broken or self.cfg.max_restarts == 0:
                raise
            # Half-loaded engines must not serve: restarted, they load the learner's weights.
            _say(
                f"{e}; restarting {', '.join(e.broken)} (rollout.max_restarts), whose engines were part-way through loading"
            )
            for name in e.broken:
                self.workers.kill(name)
            served = None
        if served is not None:
            for name, result in served.items():
                if self.probe.check(name, result) != version:
                    raise WeightSyncError(f"{name} reports version {result.version} after a sync to {version}")
            self.version = version
            return
        # Called off because the group lost a member: every worker loads the learner's weights instead.
        pair = self.learner.versioned_weights_ref()
        self.version = min(self._await({h.load_versioned.remote(pair): n for h, n in self._members()}, None))

    def _await(self, pending: dict[ray.ObjectRef, str], version: int | None) -> list[int]:
        """Wait for each worker's load; `version`: the one each must report (None: any). The versions
        reported (a worker restarted on the way reports its own)."""
        # A stopped worker is killed at its stall timeout (restarted, it loads the newest weights) rather
        # than waited on for the whole sync timeout.
        wait_watched(
            pending,
            self.workers.by_name(),
            self.workers.watch,
            self.timeout_s,
            self.workers.kill_stalled_member,
            f"the weight sync to version {version}",
        )
        done, late = ray.wait(list(pending), num_returns=len(pending), timeout=0)
        versions, lost = [], []
        for ref in late:  # stuck, or busier than the timeout allows: restarted, it loads the newest weights
            name = pending[ref]
            _say(
                f"{name}: no answer to the weight sync to version {version} within "
                f"rollout.weight_sync_timeout_s ({self.timeout_s:g}s); restarting it"
            )
            self.workers.kill(name)
            versions.append(self._revived(name))
        for ref in done:
            name = pending[ref]
            try:
                got = self.probe.check(name, self.workers.get(ref, name, self.timeout_s, TimeoutError))
            except ray.exceptions.RayActorError:  # it died: restarted, it loads the newest weights
                versions.append(self._revived(name))
                continue
            except (ray.exceptions.RayError, ActorRaised) as e:
                if self.learner is None or not _object_lost(e):
                    raise
                lost.append(name)  # the weights died with their node before it had them
                continue
            if version is not None and got != version:
                raise WeightSyncError(f"{name} reports version {got} after a sync to {version}")
            versions.append(got)
        if lost:
            return self._reload_lost(lost, version, versions)
        if version is not None:
            self.version = version
        return versions

    def _reload_lost(self, lost: list[str], version: int | None, versions: list[int]) -> list[int]:
        """The weights of `version` were lost (with the node that held them) before the workers `lost` loaded
        them: those load the learner's own, read with their version. Where the learner's ranks were on that node
        too, it is rebuilt first, and every worker loads: the others serve weights no rank has any more."""
        with self._lock:
            epoch = self._epoch
        _say(f"{', '.join(lost)}: weights version {version} were lost with their node; loading the learner's")
        pair = self.learner.versioned_weights_ref()
        with self._lock:
            rebuilt = self._epoch != epoch
        names = self.workers.names if rebuilt else lost
        reloaded = self._await({self.workers.handle(n).load_versioned.remote(pair): n for n in names}, None)
        versions = reloaded if rebuilt else versions + reloaded
        self.version = min(versions)
        return versions

    def _revived(self, name: str) -> int:
        """Worker `name` back from a restart with the newest weights: the version it serves."""
        self.workers.revive(name)
        return self.workers.serving(name, self.timeout_s)

    def _learner_rebuilt(self, rebuilt) -> None:
        """The learner was rebuilt: the weights of its lost ranks are no one's to serve. A sync of them still
        queued is left to run (the workers apply it, then the new one) but not waited on, nor loaded into a
        revived worker; the group forms again around the new rank 0, and the engines get the new weights
        now (a sync already under way, where the rank was lost, sends them itself)."""
        with self._lock:
            self._newest = None
            self._epoch += 1
        if self._queued is not None and self._queued[1] is not None:
            self._dropped += list(self._queued[1])
        self._queued = None
        if self.collective is not None:
            self._dropped += self.collective.drop()
        if not self._syncing:
            self.queue()

    def _discard_dropped(self) -> None:
        """Read the answers of dropped loads that came in (their errors are expected: their weights may be
        gone), so that Ray does not report them as unhandled."""
        done, self._dropped = (
            ray.wait(self._dropped, num_returns=len(self._dropped), timeout=0) if self._dropped else ([], [])
        )
        for ref in done:
            try:
                ray.get(ref, timeout=0)
            except Exception:  # noqa: BLE001 - a dropped load: nothing depends on it
                pass

    def _members(self):
        return zip(self.workers.handles, self.workers.names)


def _object_lost(error: BaseException) -> bool:
    """An object an actor call needed was lost with its node (raised as such, or as the actor's error)."""
    lost = ray.exceptions.ObjectLostError
    return isinstance(error, lost) or isinstance(getattr(error, "cause", None), lost)


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


__all__ = ["Served", "WeightSync"]
