"""Progress, not only deadlines: an actor that stops advancing is found within its stall timeout.

A stopped (SIGSTOP) or wedged process is alive as far as Ray knows, so no death is ever reported
and only the hour-long deadlines would end the wait. Each watched actor (created with
`concurrency_groups=CONCURRENCY_GROUPS`) answers `progress()` from a thread of its own, beside the
work it is doing, with a value that work advances (engine steps,
samples scored, micro-batches), or None while it is inside one long library call that reports
nothing (a checkpoint write, a weight load): then an answer is progress enough. An actor is stalled
when, for `timeout_s`, its probe went unanswered or its value stood still.
"""

from __future__ import annotations

import math
import sys
import threading
import time

import ray

WATCH_GROUP = "watch"
CONCURRENCY_GROUPS = {WATCH_GROUP: 1}  # for ray.remote(concurrency_groups=...) of a watched actor class
POLL_S = 5.0  # how often the waits that watch an actor look at it
NOTE_S = 30.0  # a wait this long says on the console what it waits for, and again every NOTE_S x 2


class StallWatch:
    """Watches actors while they hold work; `stalled` is called every few seconds by the waits. An
    actor not watched for a few polls (it held no work) starts its clock again when it next is."""

    def __init__(self, timeout_s: float):
        self.timeout_s = timeout_s
        self._probe: dict[str, ray.ObjectRef] = {}
        self._value: dict[str, object] = {}
        self._since: dict[str, float] = {}
        self._seen: dict[str, float] = {}  # when each was last watched
        self._lock = threading.RLock()  # a collector thread and the driver's loop may both watch

    def stalled(self, actors: dict[str, ray.actor.ActorHandle]) -> list[str]:
        """The names, among `actors` (those holding work now), that made no progress for timeout_s."""
        with self._lock:
            return self._stalled(actors)

    def _stalled(self, actors: dict[str, ray.actor.ActorHandle]) -> list[str]:
        now = time.monotonic()
        for name in actors:
            if now - self._seen.get(name, -math.inf) > 3 * POLL_S:  # idle until now: its clock starts
                self.reset(name)
            self._seen[name] = now
        for name, actor in actors.items():
            probe = self._probe.get(name)
            if probe is None:
                self._probe[name] = actor.progress.options(concurrency_group=WATCH_GROUP).remote()
                continue
            if not ray.wait([probe], timeout=0)[0]:
                continue  # unanswered: a stopped process answers nothing
            del self._probe[name]
            try:
                value = ray.get(probe, timeout=1)
            except ray.exceptions.RayError:
                continue  # it died: its death is handled where its work is awaited
            if value is None or value != self._value.get(name):
                self._value[name], self._since[name] = value, now
        return [name for name in actors if now - self._since[name] > self.timeout_s]

    def reset(self, name: str) -> None:
        """`name`'s clock starts again (a restarted actor, or one that just took work)."""
        with self._lock:
            self._probe.pop(name, None)
            self._value.pop(name, None)
            self._since[name] = time.monotonic()


class Patience:
    """The console line of a long wait: what it waits for, after NOTE_S and every 2 x NOTE_S after."""

    def __init__(self):
        self.restart()

    def restart(self) -> None:
        self._start, self._next = time.monotonic(), NOTE_S

    def note(self, what) -> None:
        """`what()`: the wait's subject, asked for only when a line is due."""
        waited = time.monotonic() - self._start
        if waited >= self._next:
            print(f"waiting {waited:.0f}s for {what()}", file=sys.stderr, flush=True)
            self._next += 2 * NOTE_S


def stalled_message(name: str, timeout_s: float, setting: str, then: str) -> str:
    return f"{name}: no progress for {timeout_s:g}s ({setting}); {then}"


def wait_watched(
    pending: dict[ray.ObjectRef, str],
    actors: dict[str, ray.actor.ActorHandle],
    watch: StallWatch,
    timeout_s: float,
    on_stalled,
    what: str,
) -> bool:
    """Wait for every ref of `pending` (ref -> name of the actor doing it), calling `on_stalled(name)`
    for an actor that holds one and made no progress; False if `timeout_s` passed first."""
    left, deadline = dict(pending), time.monotonic() + timeout_s
    patience = Patience()
    while left:
        done, _ = ray.wait(
            list(left), num_returns=len(left), timeout=max(0.0, min(POLL_S, deadline - time.monotonic()))
        )
        for ref in done:
            del left[ref]
        if not left:
            break
        if time.monotonic() >= deadline:
            return False
        for name in watch.stalled({name: actors[name] for name in set(left.values())}):
            on_stalled(name)
            watch.reset(name)
        patience.note(lambda: f"{what}: {', '.join(sorted(set(left.values())))}")
    return True
