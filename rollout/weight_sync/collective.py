"""The driver's side of the collective weight sync: it forms the group, queues each sync on the learner
and every engine, and confirms it, naming whoever failed or did not arrive.

The driver hosts the group's store (`wire.SyncStore`) and sends no weights. A sync
is queued on each engine behind the generation it holds, like the object-store one; the members meet
in the store first, so the collective itself only starts once all of them are there, and every
broadcast has `rollout.weight_sync_timeout_s`. The group is formed at the first sync and formed again
after its membership changed (an engine restarted, the learner rebuilt): a sync queued when that
happens is called off in the store, and the engines load the learner's weights through the object
store instead, with the version read together with them.
"""

from __future__ import annotations

import time

import ray

from contracts.config import RolloutConfig
from contracts.errors import first_line
from rollout.weight_sync.check import Served, WeightSyncError
from rollout.weight_sync.wire import GroupAddress, SyncPlan, SyncStore


class SyncFailed(WeightSyncError):
    """A collective sync failed part-way: `broken` names the workers whose engines may be half-loaded
    (their receipt failed, or they died in it); the others and the learner are whole."""

    def __init__(self, message: str, broken: list[str]):
        super().__init__(message)
        self.broken = broken


class CollectiveSync:
    """Group membership and the sync in flight; the workers are actors, the learner a `LearnerRanks`."""

    def __init__(self, cfg: RolloutConfig, dtype: str, workers: list, names: list[str]):
        self.cfg, self.dtype = cfg, dtype
        self.workers, self.names = workers, names
        self.store = SyncStore(ray.util.get_node_ip_address())
        self.epoch = 0  # the group's generation; 0: none formed yet
        self.sync = 0  # syncs queued in this epoch
        self.formed = False
        self.plan: SyncPlan | None = None
        self._pending: dict[ray.ObjectRef, tuple[str, str]] = {}
        self._version = 0
        self._called_off = False

    def members_changed(self) -> None:
        """An engine restarted or the learner was rebuilt: call off what is queued, form a new group next time."""
        if self._pending:
            self.store.abandon(self.epoch, "open")
            self.store.abandon(self.epoch, f"sync{self.sync}")
            self._called_off = True
        self.formed = False

    def drop(self) -> list[ray.ObjectRef]:
        """Call the queued sync off and forget it (its learner is gone): the members' pending answers, for the
        caller to discard."""
        self.members_changed()
        pending, self._pending = list(self._pending), {}
        return pending

    def queue(self, version: int, learner) -> None:
        """Queue `version`'s broadcast on the learner and its receipt on every worker (behind their generation)."""
        rc = self.cfg
        if self.plan is None:
            self.plan = learner.weight_plan(self.dtype, int(rc.weight_sync_bucket_mb * 2**20))
        pending: dict[ray.ObjectRef, tuple[str, str]] = {}  # ref -> (member, step)
        if not self.formed:
            self.epoch, self.sync, self.formed = self.epoch + 1, 0, True
            address = GroupAddress(
                self.store.host,
                self.store.port,
                self.epoch,
                world_size=1 + len(self.workers),
                arrive_timeout_s=rc.iteration_timeout_s,
                op_timeout_s=rc.weight_sync_timeout_s,
            )
            pending.update({ref: (name, "open") for ref, name in learner.open_weight_group(address).items()})
            pending.update(
                {
                    w.join_weight_group.remote(address, i + 1): (name, "open")
                    for i, (w, name) in enumerate(zip(self.workers, self.names))
                }
            )
        self.sync += 1
        pending.update({ref: (name, "send") for ref, name in learner.broadcast_weights(self.plan, self.sync).items()})
        pending.update(
            {
                w.receive_weights.remote(version, self.plan, self.sync): (name, "receive")
                for w, name in zip(self.workers, self.names)
            }
        )
        self._pending, self._version, self._called_off = pending, version, False

    def confirm(self) -> dict[str, Served] | None:
        """Wait for the queued sync: what each worker serves after it, or None when it was called off
        (the caller loads the weights another way; a worker that died restarts on the way).

        A worker that died before the broadcast began calls it off at once. One that died in it is
        judged by the others: if they finish, only it lost the weights (it restarts and loads them); if
        they fail (their collective times out on it), the sync fails naming it. Raises WeightSyncError
        naming who died, failed or is late."""
        pending, version = dict(self._pending), self._version
        timeout = self.cfg.weight_sync_timeout_s
        deadline = time.monotonic() + timeout
        called_off = False
        served: dict[str, Served] = {}
        died: list[str] = []  # in the broadcast
        broken: list[str] = []  # workers whose engines may be half-loaded
        failures: list[str] = []
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
            if not done:
                self.members_changed()
                raise WeightSyncError(
                    f"the weight sync to version {version} did not finish within "
                    f"rollout.weight_sync_timeout_s ({timeout:g}s){_died(died)}: still waiting on "
                    f"{_names(pending)}{self._absent()}"
                )
            name, step = pending.pop(done[0])
            try:
                result = ray.get(done[0])
            except ray.exceptions.RayActorError as e:
                if self._called_off or not self._began(step):
                    self.members_changed()  # the others are waiting for it: released
                else:  # the others are in the broadcast with it, and fail or finish on their own
                    died.append(f"{name} ({_as_raised(e)})")
                    broken += [name] if name in self.names else []
                called_off = True
                continue
            except ray.exceptions.RayTaskError as e:
                # The others' collectives fail on the same cause within the timeout: wait for them, so
                # that every engine left half-loaded is known.
                failures.append(f"{name}: {_as_raised(e)}")
                broken += [name] if step == "receive" else []
                continue
            if result is False or (result is None and step == "receive"):
                called_off = True
            elif step == "receive":
                served[name] = result
        if died or failures:
            self.members_changed()
        self._pending = {}
        if failures:
            raise SyncFailed(f"the weight sync to version {version} failed{_died(died)}; {'; '.join(failures)}", broken)
        return None if called_off else served

    def _began(self, step: str) -> bool:
        """Whether every member had arrived at `step`: only then can some be inside the collective."""
        key = "open" if step == "open" else f"sync{self.sync}"
        return not self.store.absent(self.epoch, key, 1 + len(self.workers))

    def _absent(self) -> str:
        members = ["learner rank 0", *self.names]
        for step in ("open", f"sync{self.sync}"):
            absent = self.store.absent(self.epoch, step, len(members))
            if absent:
                what = "the group" if step == "open" else "the sync"
                return f"; never joined {what}: {', '.join(members[r] for r in absent)}"
        return ""


def _died(died: list[str]) -> str:
    return f": {', '.join(died)} died during it" if died else ""


def _names(pending: dict[ray.ObjectRef, tuple[str, str]]) -> str:
    return ", ".join(dict.fromkeys(name for name, _ in pending.values()))


def _as_raised(error: BaseException) -> str:
    """The error as raised in the actor (a task error's own text is Ray's traceback), on one line."""
    if isinstance(error, ray.exceptions.RayTaskError) and error.cause is not None:
        return f"{type(error.cause).__name__}: {first_line(error.cause)}"
    return first_line(error)
