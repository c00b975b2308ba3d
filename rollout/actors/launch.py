"""An iteration's generation in flight on the rollout workers: each worker's stream of chunks read as they
complete, each chunk handed to its scoring at once, and a worker that died, raised or stalled told apart.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import ray

from contracts.errors import JobFailure
from contracts.rendering import PromptTask
from rollout.actors.reward_workers import Scoring
from rollout.generation.worker import GenerationSummary
from rollout.runtime.failures import raised
from rollout.runtime.stall import POLL_S, Patience


@dataclass
class Chunk:
    """One chunk's results: refs to what stays in the object store, and its small summary."""

    batch: ray.ObjectRef  # the generation batch (Arrow), for the scorer, the learner and the archive
    summary: GenerationSummary
    scoring: Scoring | None = None  # its rewards under way, when the launch was given a `score`


@dataclass
class Share:
    """One worker's part of an iteration: its chunks (with their seeds), and which came back."""

    worker: int
    chunks: list[list[PromptTask]]
    seeds: list[int | None]
    done: set[int] = field(default_factory=set)

    def tasks(self, index: int, summary: GenerationSummary) -> list[PromptTask]:
        """The prompts of the chunk that came back as `index` with `summary`."""
        return self.chunks[index]

    def returned(self, index: int, summary: GenerationSummary) -> None:
        self.done.add(index)

    def left(self) -> Share:
        """What a replacement of the worker must generate: the chunks that did not come back."""
        todo = [i for i in range(len(self.chunks)) if i not in self.done]
        return Share(self.worker, [self.chunks[i] for i in todo], [self.seeds[i] for i in todo])

    def has_work(self) -> bool:
        return bool(self.chunks)

    def progress(self) -> str:
        return f"{len(self.done)} of {len(self.chunks)} chunks back"


@dataclass
class PartialShare:
    """One worker's part of an iteration with partial rollouts: fresh prompts, how many groups to hand out,
    the oldest version whose groups must be handed out now, and `held`, every prompt the worker holds (given
    by this launch or an earlier one), which this call's chunks take out as they come back. One such call
    runs on a worker at a time."""

    worker: int
    tasks_given: list[PromptTask]
    seeds: list[int | None]
    quota: int
    oldest: int
    held: dict[str, list[PromptTask]]
    back: int = 0

    def tasks(self, index: int, summary: GenerationSummary) -> list[PromptTask]:
        return [self.held[i][0] for i in summary.prompt_ids]

    def returned(self, index: int, summary: GenerationSummary) -> None:
        for prompt_id in summary.prompt_ids:  # a prompt the data holds twice may be held twice
            self.held[prompt_id].pop()
            if not self.held[prompt_id]:
                del self.held[prompt_id]
        self.back += len(summary.prompt_ids)

    def left(self) -> PartialShare:
        """The worker died with everything it held: what it was given and did not hand back is generated
        again, whole, by its replacement (which holds it from then on)."""
        redo = [task for tasks in self.held.values() for task in tasks]
        return PartialShare(
            self.worker, redo, [None] * len(redo), max(0, self.quota - self.back), self.oldest, self.held
        )

    def has_work(self) -> bool:
        return bool(self.tasks_given) or self.quota > 0

    def progress(self) -> str:
        return f"{self.back} of {self.quota} groups back"


class Launch:
    """An iteration's generation in flight. A daemon thread reads the workers' streams as chunks
    complete and hands each batch to `score` (with the chunk's prompts) at once, so scoring overlaps
    whatever the driver is waiting on (the learner, with rollout.max_staleness > 0); `chunks` yields
    them as they come.

    A stream whose worker died is replaced: `restart(share)` waits for Ray to restart the worker,
    gives it the newest weights and streams the share's unfinished chunks from there. A chunk is
    handed on only once its summary arrived, so a chunk cut by the death is generated again, once.
    A worker that makes no progress is killed by `kill_stalled(worker indices)`, and so replaced too;
    a restart starts the iteration's deadline again."""

    _DONE = object()
    _RESTARTED = object()

    def __init__(
        self,
        streams: dict[ray.ObjectRefGenerator, Share | PartialShare],
        score: Callable[[ray.ObjectRef, list[PromptTask]], Scoring] | None,
        timeout: float,
        what: str,
        restart,
        kill_stalled,
        names: list[str],
    ):
        self.timeout, self.what = timeout, what
        self._names = names
        self._score = score
        self._restart = restart
        self._kill_stalled = kill_stalled
        self._queue: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._pump, args=(streams,), daemon=True, name=f"collect {what}")
        self._thread.start()

    def chunks(self) -> Iterator[Chunk]:
        while True:
            try:
                item = self._queue.get(timeout=self.timeout)
            except queue.Empty:
                raise self._timed_out() from None
            if item is self._DONE:
                return
            if item is self._RESTARTED:
                continue
            if isinstance(item, BaseException):
                raise item
            yield item

    def collect(self) -> list[Chunk]:
        return list(self.chunks())

    def _timed_out(self) -> GenerationTimeout:
        return GenerationTimeout(
            f"{self.what}: no chunk finished within rollout.iteration_timeout_s ({self.timeout:.0f}s)"
        )

    def _pump(self, streams: dict[ray.ObjectRefGenerator, Share]) -> None:
        try:
            batches: dict[ray.ObjectRefGenerator, ray.ObjectRef] = {}  # a chunk's batch, until its summary
            self._last_item = time.monotonic()
            patience = Patience()
            while streams:
                ready, _ = ray.wait(list(streams), num_returns=1, timeout=POLL_S)
                if not ready:
                    if time.monotonic() - self._last_item > self.timeout:
                        raise self._timed_out()
                    self._kill_stalled({share.worker for share in streams.values()})
                    patience.note(lambda: self._waiting_for(streams))
                    continue
                self._last_item = time.monotonic()
                patience.restart()
                stream = ready[0]
                name = self._names[streams[stream].worker]
                try:
                    ref = next(stream)
                    if stream not in batches:
                        batches[stream] = ref
                        continue
                    index, summary = ray.get(ref, timeout=self.timeout)
                except StopIteration:
                    if stream in batches:  # a batch and no summary: the worker died or raised mid-chunk
                        _raise_if_raised(batches[stream], name)
                        self._replace(stream, streams, batches)
                    else:
                        del streams[stream]
                    continue
                except ray.exceptions.RayTaskError as e:
                    raise raised(name, e) from None
                except ray.exceptions.RayActorError:
                    self._replace(stream, streams, batches)
                    continue
                batch, share = batches.pop(stream), streams[stream]
                scoring = self._score(batch, share.tasks(index, summary)) if self._score is not None else None
                share.returned(index, summary)
                self._queue.put(Chunk(batch, summary, scoring))
            self._queue.put(self._DONE)
        except BaseException as e:  # noqa: BLE001 - handed to the reader, which raises it
            self._queue.put(e)

    def _waiting_for(self, streams: dict) -> str:
        shares = list(streams.values())
        return f"{self.what}: " + ", ".join(f"{self._names[s.worker]} ({s.progress()})" for s in shares)

    def _replace(self, stream, streams: dict, batches: dict) -> None:
        share = streams.pop(stream)
        lost = batches.pop(stream, None)
        if lost is not None:
            _discard(lost)
        left = share.left()
        if left.has_work():
            self._queue.put(self._RESTARTED)  # a restart may take a while: no deadline runs out meanwhile
            streams[self._restart(left)] = left
            self._last_item = time.monotonic()
            self._queue.put(self._RESTARTED)  # the reader's deadline starts again


def _raise_if_raised(ref: ray.ObjectRef, worker: str) -> None:
    """Raise the exception the worker's code raised, if that is what `ref` holds: an error of the job,
    the same on any worker, so it is shown once instead of generated again. A death is not raised:
    the worker is restarted and its chunks redone."""
    try:
        ray.get(ref, timeout=10)
    except ray.exceptions.RayTaskError as e:
        raise raised(worker, e) from None
    except Exception:  # noqa: BLE001 - lost with the worker's process: the restart redoes it
        pass


def _discard(ref: ray.ObjectRef) -> None:
    """Fetch a result lost with its worker, so that Ray does not report it as an unhandled error."""
    try:
        ray.get(ref, timeout=1)
    except Exception:  # noqa: BLE001 - the error is the point: it is known and handled here
        pass


class GenerationTimeout(JobFailure):
    """No chunk of an iteration came back in time; the message says which iteration."""
