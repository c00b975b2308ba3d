"""The Ray edge of one plain object (a `RolloutWorker`, a `RewardWorker`, a `Learner`): one actor class
per role derives from `Member`, and its typed methods call the object it holds (`core`).

A member that fails to build its object in its constructor stays alive and raises that error, by type,
from every call, `ready()` first: the group waiting on it names the member and the error it raised,
instead of Ray reporting an actor that died in its creation task with the error as text. Ray-restarted
members (rollout and reward workers) rebuild their object the same way, and say so in their log.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from contracts.console import route_actor_output, set_actor_env
from rollout.runtime.stall import CONCURRENCY_GROUPS
from rollout.runtime.telemetry import announce_if_restarted

__all__ = ["CONCURRENCY_GROUPS", "Member"]


class Member:
    kind = "actor"  # rollout, reward, learner: in log lines and the restart counter

    def __init__(self, name: str, process_env: dict[str, str], build: Callable[[], Any] | None = None):
        """`process_env`: the environment the driver gives its actors (`contracts.console.actor_env`), set
        before anything else."""
        set_actor_env(process_env)
        route_actor_output()
        self.name = name
        self._core: Any = None
        self._start_error: BaseException | None = None
        self.restarted = announce_if_restarted(self.kind, name)
        if build is not None:
            self.build(build)

    def build(self, build: Callable[[], Any]) -> None:
        """Build the plain object; an error is kept and raised by every call instead of ending the actor."""
        try:
            self._core = build()
        except Exception as e:  # noqa: BLE001 - raised again, by type, from `core`
            self._start_error = e

    @property
    def core(self) -> Any:
        if self._start_error is not None:
            raise self._start_error
        return self._core

    def __repr__(self) -> str:  # Ray names the actor by it in its errors and log lines
        return getattr(self, "name", type(self).__name__)  # asked for even when __init__ failed

    def ready(self) -> str:
        """The member's name once its object is built; its start-up error otherwise."""
        self.core  # noqa: B018 - raises the start-up error
        return self.name

    def progress(self) -> int | None:
        """A value its work advances, for the stall watch (rollout.runtime.stall); None: inside one long call."""
        return self.core.progress()
