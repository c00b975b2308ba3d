"""Waiting for Ray to place actors: said on the console every NOTE_S while it lasts, bounded by
`ray.actor_start_timeout_s` at start-up and `ray.node_wait_timeout_s` after a loss. A lost node's
actors, or a cluster that is adding one, can wait for minutes; a wait that prints nothing looks
like a hang."""

from __future__ import annotations

import sys
import time

import ray

from rollout.runtime.stall import NOTE_S


def wait_placed(refs: list, timeout_s: float, what: str, setting: str = "ray.actor_start_timeout_s") -> list:
    """`ray.wait` for all of `refs` (actors' ready calls, a placement group's ready()), saying so every
    NOTE_S; the refs still pending at the timeout."""
    start = time.monotonic()
    pending = list(refs)
    while pending:
        left = timeout_s - (time.monotonic() - start)
        if left <= 0:
            break
        _, pending = ray.wait(pending, num_returns=len(pending), timeout=min(NOTE_S, left))
        waited = time.monotonic() - start
        if pending and waited < timeout_s:
            note_waiting(what, waited, timeout_s, setting)
    return pending


def note_waiting(what: str, waited: float, timeout_s: float, setting: str) -> None:
    print(
        f"{what}: not started yet ({waited:.0f}s of {setting} {timeout_s:.0f}s); the cluster has {free_resources()} free",
        file=sys.stderr,
        flush=True,
    )


def free_resources() -> str:
    free = ray.available_resources()
    shown = [f"{value:g} {name}" for name, value in sorted(free.items()) if name in ("CPU", "GPU")]
    return ", ".join(shown) or "no CPU or GPU"
