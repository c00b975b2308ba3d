"""Partial rollouts: a worker's groups generate across iteration boundaries and weight loads.

A group is one prompt's n samples. The worker holds its groups in one pool, and one thread (the engine loop,
`_loop`) feeds them to the engine and steps it whenever any is unfinished, between calls as well, so the
engine keeps generating while the learner updates. A call (`take`) adds the iteration's fresh prompts and
hands out the first `quota` groups to complete; those still running stay in the pool for a later call.

Anything else that needs the engine (a weight load, an evaluation's generation, the weights probe) runs
inside `paused()`: the loop stops between two steps, every request in flight is aborted with its tokens
and their logprobs kept, and once the block ends each unfinished sample is submitted again as its prompt
plus its tokens so far (once a block ends well: after one that raised, a weight load that failed, they wait), with the tokens left of `max_tokens`. The engine recomputes that prefix under the
weights it serves then (no KV cache of the old weights is used), and no token is sampled twice. Each
sample records where it was resumed and under which version (`resumed_at`, `resumed_versions`).

Staleness: a group's version is its first token's. A call is told the oldest version its iteration may
train (`oldest`); it does not return while a group started under an older version is still running,
since that group would be trained later still, so it finishes it (the rest of the engine's batch keeps
generating meanwhile).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from contracts.config import SamplingConfig
from contracts.rendering import PromptTask
from rollout.generation.completions import Completion
from rollout.generation.engine import RequestId, SampleOutput, VLLMEngine


@dataclass(slots=True)
class Progress:
    """One sample so far: the tokens of its finished parts, and the engine's part in flight (`live`)."""

    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    text: str = ""
    finish: str | None = None
    resumed_at: list[int] = field(default_factory=list)
    resumed_versions: list[int] = field(default_factory=list)
    live: SampleOutput | None = None  # the engine extends it in place while its request runs

    def fold(self) -> None:
        """The part in flight becomes part of the sample (its request finished or was aborted)."""
        if self.live is not None:
            self.token_ids += self.live.token_ids
            self.logprobs += self.live.logprobs
            self.text += self.live.text
            self.finish = self.live.finish_reason
            self.live = None


@dataclass
class Group:
    task: PromptTask
    seed: int | None
    samples: list[Progress]
    version: int | None = None  # the weights' version at its first token; None: not started
    resumes: int = 0

    @property
    def complete(self) -> bool:
        return all(s.finish is not None for s in self.samples)


class PartialRollouts:
    def __init__(self, engine: VLLMEngine, sampling: SamplingConfig, n: int, version: Callable[[], int]):
        """`version()`: the version of the weights the engine serves (read under the pool's lock)."""
        self.engine, self.sampling, self.n, self.version = engine, sampling, n, version
        self._lock = threading.Condition(threading.RLock())
        self._waiting: deque[Group] = deque()  # fresh groups not in the engine yet
        self._cut: deque[tuple[Group, int]] = deque()  # samples aborted by a pause, to submit again
        self._running: dict[RequestId, tuple[Group, int | None]] = {}  # None: a group's first request, all n
        self._done: deque[Group] = deque()  # complete, not handed out yet
        self._in_flight = 0  # sequences in the engine
        self._pausing = 0  # paused() blocks waiting for the lock: the loop lets them in
        self._paused = 0
        self._failed_load = False
        self._closed = False
        self._error: BaseException | None = None
        self.resumed = 0  # samples submitted again after a pause, so far
        self._thread = threading.Thread(target=self._loop, daemon=True, name="engine loop")
        self._thread.start()

    # -- calls ------------------------------------------------------------------------------------

    def take(
        self, tasks: list[PromptTask], seeds: list[int | None], quota: int, oldest: int, chunk: int
    ) -> Iterator[list[Group]]:
        """Add `tasks` (each with its seed) as fresh groups; yield completed groups, up to `chunk` at a time,
        until `quota` were handed out and no group started before version `oldest` is left (one that is, is
        handed out whatever the quota: later, it would be too stale to train), or nothing is left to run."""
        with self._lock:
            self._waiting.extend(Group(t, s, [Progress() for _ in range(self.n)]) for t, s in zip(tasks, seeds))
            self._lock.notify_all()
        handed = 0
        while True:
            with self._lock:
                self._lock.wait_for(lambda: self._ready_to_hand(handed, quota, oldest, chunk), timeout=1.0)
                self._raise_if_failed()
                ready = self._hand_out(handed, quota, oldest, chunk)
                finished = handed + len(ready) >= quota and not self._older_left(oldest)
                exhausted = not ready and not self._has_work() and not self._done
            if ready:
                handed += len(ready)
                yield ready
            if finished or exhausted:
                return

    def held(self) -> list[str]:
        """The prompt ids of every group the pool holds (running, cut, waiting or done)."""
        with self._lock:
            groups = [g for g, _ in self._running.values()] + [g for g, _ in self._cut]
            groups += list(self._waiting) + list(self._done)
            return list(dict.fromkeys(g.task.prompt_id for g in groups))

    @contextmanager
    def paused(self):
        """The engine to the caller alone: requests in flight aborted (their tokens kept) and the loop stopped,
        until the block ends; then the cut samples are submitted again, under the weights served then."""
        self._pausing += 1
        with self._lock:
            self._pausing -= 1
            self._paused += 1
            try:
                self._cut_running()
                yield
                self._failed_load = False
            except BaseException:
                # A weight load that failed half way leaves the engine's weights unknown: the cut samples wait,
                # resumable, until a later block (the sync's retry, a restore) ends well.
                self._failed_load = True
                raise
            finally:
                self._paused -= 1
                self._lock.notify_all()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._lock.notify_all()
        self._thread.join(timeout=10)
        with self._lock:
            self.engine.abort(list(self._running))

    # -- the engine loop ------------------------------------------------------------------------------

    def _loop(self) -> None:
        try:
            while True:
                if self._pausing:  # a weight load waits for the lock: let it in before the next step
                    time.sleep(0.001)
                    continue
                with self._lock:
                    self._lock.wait_for(lambda: self._closed or (self._can_step() and not self._pausing))
                    if self._closed:
                        return
                    if self._pausing:
                        continue
                    self._admit()
                    self._harvest(self.engine.step())
                    self._lock.notify_all()
        except BaseException as e:  # noqa: BLE001 - raised to the call reading the pool
            with self._lock:
                self._error = e
                self._lock.notify_all()

    def _can_step(self) -> bool:
        return not self._paused and not self._failed_load and self._has_work()

    def _has_work(self) -> bool:
        return bool(self._running or self._cut or self._waiting)

    def _admit(self) -> None:
        """Fill the engine's window: cut samples first (they are the oldest), then fresh groups."""
        room = self.engine.window - self._in_flight
        while self._cut and room > 0:
            group, k = self._cut.popleft()
            self._submit_rest(group, k)
            room -= 1
        while self._waiting and (room >= self.n or not self._in_flight):
            group = self._waiting.popleft()
            group.version = self.version()
            params = self.engine.sampling_params(self.sampling, self.n, group.seed, one_request=True)
            self._running[self.engine.submit(group.task.prompt_ids, params, (group, None), stream=True)] = (group, None)
            self._in_flight += self.n
            room -= self.n

    def _submit_rest(self, group: Group, k: int) -> None:
        sample = group.samples[k]
        left = self.sampling.max_tokens - len(sample.token_ids)
        if left <= 0:
            sample.finish = "length"
            self._complete_if_done(group)
            return
        if not any(s.token_ids for s in group.samples):  # cut before its first token: it starts now
            group.version = self.version()
        else:
            sample.resumed_at.append(len(sample.token_ids))
            sample.resumed_versions.append(self.version())
            self.resumed += 1
        group.resumes += 1
        seed = None if group.seed is None else (group.seed * 1_000_003 + k) * 10_007 + group.resumes
        params = self.engine.sampling_params(self.sampling, 1, seed, one_request=True, max_tokens=left)
        request = self.engine.submit(list(group.task.prompt_ids) + sample.token_ids, params, (group, k), stream=True)
        self._running[request] = (group, k)
        self._in_flight += 1

    def _harvest(self, outputs) -> None:
        for out in outputs:
            group, k = self._running.get(out.id, (None, None))
            if group is None:
                continue
            self._attach(group, k, out.samples)
            if out.finished:
                del self._running[out.id]
                self._in_flight -= len(out.samples)
                for sample in self._samples_of(group, k):
                    sample.fold()
                self._complete_if_done(group)

    def _attach(self, group: Group, k: int | None, samples: list[SampleOutput]) -> None:
        """The engine's running samples of the request (streamed: extended in place from now on)."""
        for sample, live in zip(self._samples_of(group, k), samples):
            sample.live = live

    def _samples_of(self, group: Group, k: int | None) -> list[Progress]:
        return group.samples if k is None else [group.samples[k]]

    def _complete_if_done(self, group: Group) -> None:
        if group.complete and not any(g is group for g, _ in self._running.values()):
            self._done.append(group)

    def _cut_running(self) -> None:
        for out in self.engine.abort(list(self._running)):
            group, k = self._running.pop(out.id)
            self._attach(group, k, out.samples)
            for index, sample in zip(range(self.n) if k is None else [k], self._samples_of(group, k)):
                sample.fold()
                if sample.finish is None:
                    self._cut.append((group, index))
            self._complete_if_done(group)
        self._running.clear()
        self._in_flight = 0

    # -- hand-out rules ---------------------------------------------------------------------------------

    def _hand_out(self, handed: int, quota: int, oldest: int, chunk: int) -> list[Group]:
        """Up to `chunk` completed groups, in the order they completed: within the quota, or too old to wait."""
        ready, kept = [], deque()
        while self._done and len(ready) < chunk:
            group = self._done.popleft()
            if handed + len(ready) < quota or _older(group, oldest):
                ready.append(group)
            else:
                kept.append(group)
        self._done.extendleft(reversed(kept))
        return ready

    def _ready_to_hand(self, handed: int, quota: int, oldest: int, chunk: int) -> bool:
        if self._error is not None or self._closed:
            return True
        eligible = sum(1 for g in self._done if _older(g, oldest)) + max(0, min(quota - handed, len(self._done)))
        if eligible >= chunk:
            return True
        if handed + eligible >= quota and not self._older_running(oldest):
            return True  # the call's last chunk
        return not self._has_work()  # nothing left to run: hand out what there is

    def _older_running(self, oldest: int) -> bool:
        """A group started before version `oldest` is still unfinished (running, or cut by a pause)."""
        groups = [g for g, _ in self._running.values()] + [g for g, _ in self._cut]
        return any(_older(g, oldest) for g in groups)

    def _older_left(self, oldest: int) -> bool:
        return self._older_running(oldest) or any(_older(g, oldest) for g in self._done)

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise RuntimeError(f"the engine loop failed: {self._error}") from self._error


def _older(group: Group, oldest: int) -> bool:
    return group.version is not None and group.version < oldest


def completions(engine: VLLMEngine, groups: list[Group]) -> list[list[Completion]]:
    """Each group's samples as completions, with the version of each one's first token and its resumes."""
    return [
        [
            Completion(
                token_ids=s.token_ids,
                logprobs=s.logprobs,
                text=engine.completion_text(s.text, s.token_ids),
                finish_reason=s.finish or "error",
                policy_version=g.version,
                resumed_at=s.resumed_at,
                resumed_versions=s.resumed_versions,
            )
            for s in g.samples
        ]
        for g in groups
    ]
