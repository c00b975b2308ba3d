"""The one shape of every group of actors: members with names, placed within a timeout, watched for
progress, killed when stalled, and released.

Each role's group (`RolloutWorkers`, `RewardWorkers`, `LearnerRanks`, a file each beside this one)
derives from `ActorGroup` and owns its own recovery: Ray restarts a rollout or reward worker that
died (the group waits for it and brings it up to date), while the learner's ranks are rebuilt as a
whole from the newest checkpoint. Callers see the group's typed methods and the project's errors,
never Ray's: a member's own error comes out as `ActorRaised` naming it, a member that never started
or never came back as `ActorStartError`.
"""

from __future__ import annotations

import sys
import time

import ray
from ray.util.placement_group import placement_group, remove_placement_group

from contracts.errors import first_line
from rollout.runtime.failures import ActorStartError, raised, start_failed
from rollout.runtime.placement import free_resources, note_waiting, wait_placed
from rollout.runtime.stall import NOTE_S, POLL_S, Patience, StallWatch, stalled_message


class ActorGroup:
    kind = "actor"  # rollout, reward, learner
    stall_setting = ""  # the config field of the stall timeout, named when a member is killed for it
    on_stall = ""  # what becomes of a member killed for a stall, as the console says it
    restarted_by_ray = True  # members Ray restarts (rollout, reward); the learner is rebuilt instead

    def __init__(self, names: list[str], handles: list, *, stall_timeout_s: float, max_restarts: int, log=None):
        self.names = names
        self.max_restarts = max_restarts
        self.handles = handles
        self.watch = StallWatch(stall_timeout_s)
        self.log = log or sys.stderr
        self.restarts = 0  # members found dead and brought back
        self.placement = None  # the placement group of members placed together, if they are

    def handle(self, name: str):
        return self.handles[self.names.index(name)]

    def by_name(self, names=None) -> dict:
        return {name: self.handle(name) for name in (self.names if names is None else names)}

    # -- start -------------------------------------------------------------------------------------

    def wait_started(self, pending: dict, timeout_s: float, setting: str, asked: str) -> None:
        """Wait for each member's `ready()` (ref -> member name), saying so while Ray places them;
        ActorStartError naming the late ones and what each asked for, or the one that failed to start."""
        late = wait_placed(list(pending), timeout_s, ", ".join(pending.values()), setting)
        if late:
            raise ActorStartError(
                f"{', '.join(pending[r] for r in late)} did not start within {setting} ({timeout_s:.0f}s): "
                f"each needs {asked}; the cluster has {free_resources()} free"
            )
        for ref, name in pending.items():
            try:
                ray.get(ref, timeout=timeout_s)
            except ray.exceptions.RayTaskError as e:
                raise start_failed(name, raised(name, e).cause) from None

    def place_together(self, what: str, bundle: dict, count: int, timeout_s: float, setting: str, fix: str) -> None:
        """Reserve `count` x `bundle` packed together (a placement group, `self.placement`), saying so while Ray
        places them; ActorStartError naming what is free and `fix` when it cannot within `timeout_s`."""
        self.placement = placement_group([bundle] * count, strategy="PACK")
        if wait_placed([self.placement.ready()], timeout_s, what, setting):
            remove_placement_group(self.placement)
            self.placement = None
            raise ActorStartError(
                f"{what} x {bundle} could not be placed within {setting} ({timeout_s:.0f}s); the cluster has "
                f"{free_resources()} free: {fix}"
            )

    def wait_back(self, name: str, timeout_s: float, setting: str, asked: str) -> None:
        """Wait for Ray to restart `name`, saying so every NOTE_S; ActorStartError when it does not come
        back (its restarts spent, or no room to place it within `timeout_s`)."""
        handle = self.handle(name)
        deadline = time.monotonic() + timeout_s
        next_note = time.monotonic() + NOTE_S
        while True:
            try:
                ray.get(handle.ready.remote(), timeout=max(1.0, deadline - time.monotonic()))
                return
            except ray.exceptions.ActorUnavailableError:  # restarting: not up yet
                if time.monotonic() > deadline:
                    raise ActorStartError(
                        f"{name} died and was not back within {setting} ({timeout_s:.0f}s): the cluster has "
                        f"{free_resources()} free and it needs {asked}"
                    ) from None
                if time.monotonic() > next_note:
                    note_waiting(f"{name} (restarting)", timeout_s - (deadline - time.monotonic()), timeout_s, setting)
                    next_note += NOTE_S
                time.sleep(0.5)
            except ray.exceptions.RayTaskError as e:  # back, but its object failed to build again
                raise raised(name, e) from None
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError) as e:
                raise ActorStartError(
                    f"{name} died and did not come back ({self.kind}.max_restarts {self.max_restarts}; {setting} "
                    f"{timeout_s:.0f}s): {first_line(e)}"
                ) from None

    def get(self, ref: ray.ObjectRef, name: str, timeout_s: float, late):
        """Member `name`'s answer `ref`: its code's error as ActorRaised naming it, `late()` (an error to
        raise) when it does not come within `timeout_s`. A death stays Ray's RayActorError: what to do
        about it is the group's recovery."""
        try:
            return ray.get(ref, timeout=timeout_s)
        except ray.exceptions.RayTaskError as e:
            raise raised(name, e) from None
        except ray.exceptions.GetTimeoutError:
            raise late() from None

    def wait_all(self, pending: dict, timeout_s: float, late) -> None:
        """Wait for every answer (ref -> member name), raising as soon as one fails: the others may be
        blocked in a collective with it, and would only give up at the timeout. A member that makes no
        progress meanwhile is killed; `late(names)` is the error when `timeout_s` passes first."""
        left, patience = list(pending), Patience()
        deadline = time.monotonic() + timeout_s
        while left:
            remaining = deadline - time.monotonic()
            done, left = ray.wait(left, num_returns=1, timeout=max(0.0, min(POLL_S, remaining)))
            if not done:
                if remaining <= 0:
                    raise late([pending[r] for r in left])
                self.kill_stalled(pending[r] for r in left)
                patience.note(lambda: ", ".join(pending[r] for r in left))
                continue
            self.get(done[0], pending[done[0]], timeout_s, lambda: late([pending[done[0]]]))

    # -- watching ----------------------------------------------------------------------------------

    def kill_stalled(self, busy) -> list[str]:
        """Kill the members among `busy` (names) that made no progress for the stall timeout, as if they
        had died; the names killed."""
        killed = self.watch.stalled(self.by_name(busy))
        for name in killed:
            self.kill_stalled_member(name)
        return killed

    def kill_stalled_member(self, name: str) -> None:
        """Kill `name`, found stalled, saying why and what becomes of it."""
        print(stalled_message(name, self.watch.timeout_s, self.stall_setting, self.on_stall), file=self.log, flush=True)
        self.kill(name)
        self.watch.reset(name)

    def kill(self, name: str) -> None:
        """End `name`'s process; Ray restarts it if this group's members are restarted by Ray."""
        ray.kill(self.handle(name), no_restart=not self.restarted_by_ray)

    def release(self) -> None:
        for handle in self.handles:
            ray.kill(handle)
        if self.placement is not None:
            remove_placement_group(self.placement)
            self.placement = None
