"""Collection, launch -> score -> select: prompts queued on the rollout workers, each chunk handed to the
reward workers as it completes, the episodes checked against `env.max_error_fraction` and, with dynamic
sampling, more rounds of prompts until enough groups carry a signal.

`rollout run` launches iterations ahead and collects one at a time (`launch`, `collect`); `rollout generate`
streams one pass over every prompt (`stream`). With partial rollouts each launch gives the workers the
iteration's fresh prompts (the first one a spare half more, which the workers keep in flight from then on)
and takes back the first groups to complete; a row whose first token is too old for
`rollout.max_staleness` by the time it trains is left out and counted. Each round's generation recovers its own workers (`Launch`);
what it cannot mend, and an environment that failed too many episodes, ends the job with one line.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

import msgspec
import numpy as np
import pyarrow as pa
import ray
from tqdm import tqdm

from contracts.config import EnvConfig, JobConfig
from contracts.errors import JobFailure
from contracts.rendering import PromptTask
from rollout.actors.launch import Chunk
from rollout.actors.reward_workers import RewardWorkers, Scoring
from rollout.actors.rollout_workers import RolloutWorkers
from rollout.driver.dynamic_sampling import Selection, round_size, select
from rollout.driver.iteration import Launched, Samples
from rollout.driver.prompts import PromptSampler
from rollout.driver.startup import RunData
from rollout.weight_sync.sync import WeightSync

if TYPE_CHECKING:
    from rollout.driver.evaluation import Evaluations


class Collector:
    def __init__(
        self,
        cfg: JobConfig,
        data: RunData,
        workers: RolloutWorkers,
        rewards: RewardWorkers,
        *,
        run_id: str,
        log,
        sampler: PromptSampler | None = None,
        weights: WeightSync | None = None,
        evaluations: Evaluations | None = None,
    ):
        """`sampler`: picks each iteration's prompts (`launch`); `weights`: the sync a launch is queued behind,
        confirmed before its chunks are read; `evaluations`: the held-out evaluations queued on the same
        workers (`rollout.driver.evaluation`)."""
        self.cfg, self.data, self.log, self.run_id = cfg, data, log, run_id
        self.workers, self.rewards, self.weights = workers, rewards, weights
        self.sampler = sampler
        self.launched: dict[int, Launched] = {}  # iterations whose generation is queued, not yet collected
        self.said_short = False  # dynamic sampling's console line, said once per run
        self.evaluations = evaluations
        self.partial_started = False

    def launch(self, iteration: int, trains_at: int | None = None) -> None:
        """Sample the iteration's prompts and queue their generation, and each chunk's scoring behind it
        (once: an iteration launched already is left as it is). `trains_at`: the policy version that will
        train it (partial rollouts hand out, and keep, groups by it)."""
        if iteration in self.launched:
            return
        wanted = self.cfg.rollout.prompts_per_iteration
        if not self.cfg.rollout.partial_rollouts:
            self.launched[iteration] = self._round(iteration, self.data.prompts.draw(self.sampler, wanted))
            return
        if trains_at is None:
            raise ValueError("partial rollouts launch an iteration with the version that will train it")
        size = wanted + (0 if self.partial_started else math.ceil(wanted * PARTIAL_SPARE))
        self.partial_started = True
        held = self.data.prompts.rows_of(i for held in self.workers.held for i in held)
        indices = self.data.prompts.draw(self.sampler, size, held)
        self.launched[iteration] = self._round(iteration, indices, quota=wanted, trains_at=trains_at)

    def collect(self, iteration: int, timings: dict[str, float]) -> Samples:
        """Wait for the iteration's generation, then its rewards; only summaries and rewards come here. With
        dynamic sampling, more rounds of prompts until enough groups carry a signal."""
        launched = self.launched.pop(iteration)
        if launched.after_sync:
            start = time.perf_counter()
            self.weights.confirm()
            timings["generate"] = time.perf_counter() - start
        chunks, rewards, latency = self._gathered(iteration, launched, timings)
        sampling = self.cfg.rollout.dynamic_sampling
        wanted, n = self.cfg.rollout.prompts_per_iteration, self.cfg.rollout.n_samples
        selection, rounds, used = None, 1, set(launched.indices)
        while sampling.enabled:
            selection = select(rewards, n, wanted)
            if selection.kept >= wanted or rounds == sampling.max_rounds:
                break
            size = round_size(wanted - selection.kept, selection.kept, len(used), len(self.data.prompts) - len(used))
            indices = self.data.prompts.draw(self.sampler, size, frozenset(used))
            extra = self._round(iteration, indices, quota=len(indices), trains_at=launched.trains_at)
            used.update(extra.indices)
            more = self._gathered(iteration, extra, timings)
            chunks, rewards, rounds = chunks + more[0], rewards + more[1], rounds + 1
            latency = {k: latency.get(k, 0.0) + more[2].get(k, 0.0) for k in {*latency, *more[2]}}
        if selection is not None:
            self._say_short_once(iteration, selection.kept, wanted, rounds)
        sampler = msgspec.to_builtins(self.sampler) if rounds > 1 else launched.sampler
        samples = Samples(iteration, chunks, rewards, sampler, latency, selection, rounds)
        if launched.trains_at is not None:
            samples.selection, samples.dropped_stale = without_stale(
                chunks, selection, launched.trains_at - self.cfg.rollout.max_staleness
            )
            samples.carried_over = self.workers.held_groups()
        return samples

    def stream(self, desc: str, what: str) -> Iterator[tuple[Chunk, pa.RecordBatch]]:
        """Every prompt's samples once, as iteration 0 (`rollout generate`): each chunk with its reward columns,
        as it is scored (`desc`: the progress bar's; `what`: what a scoring time-out names). Once all are back,
        EnvironmentFailure if more than `env.max_error_fraction` of the episodes failed in their environment."""
        launched = self._round(0, self.data.prompts.usable())
        summaries = []
        for chunk in self._with_progress(launched, desc, leave=True):
            [rewards], _ = self.rewards.scores([chunk.scoring], self.cfg.rollout.iteration_timeout_s, what)
            summaries.append(chunk.summary)
            yield chunk, rewards
        check_episodes(self.cfg.env, 0, summaries)

    def _round(
        self, iteration: int, indices: list[int], *, quota: int | None = None, trains_at: int | None = None
    ) -> Launched:
        """The prompts `indices` (records) queued for generation, and each chunk's scoring behind it; with
        partial rollouts (`trains_at`), `quota` groups to take back, whichever complete first."""
        prompts = self.data.prompts
        tasks = [prompts.task(i) for i in indices]
        if trains_at is not None:
            oldest = trains_at - self.cfg.rollout.max_staleness + 1  # older groups would be too stale next time
            generation = self.workers.submit_partial(
                tasks, quota, oldest=oldest, run_id=self.run_id, iteration=iteration, score=self._score
            )
        else:
            records = {record.prompt_id: record for record in map(prompts.record, indices)}
            generation = self.workers.submit(
                tasks, run_id=self.run_id, iteration=iteration, score=self._score, records=records
            )
        # The data cursor after this iteration's prompts: what a checkpoint of this iteration resumes from.
        after_sync = self.weights is not None and self.weights.queued()
        return Launched(generation, msgspec.to_builtins(self.sampler), after_sync, indices, trains_at)

    def _score(self, batch: ray.ObjectRef, tasks: list[PromptTask]) -> Scoring:
        """A chunk's scoring, queued as it completes: the reward workers read its prompts' data records."""
        records = [self.data.prompts.by_id(i) for i in dict.fromkeys(t.prompt_id for t in tasks)]
        return self.rewards.score(batch, records)

    def _gathered(self, iteration: int, launched: Launched, timings: dict[str, float]):
        """(chunks, reward batches, scoring seconds) of one round of the iteration's generation."""
        start = time.perf_counter()
        chunks = list(self._with_progress(launched, f"iter {iteration} generate", leave=False))
        timings["generate"] = timings.get("generate", 0.0) + time.perf_counter() - start
        check_episodes(self.cfg.env, iteration, [c.summary for c in chunks])
        start = time.perf_counter()
        rewards, latency = self.rewards.scores(
            [c.scoring for c in chunks], self.cfg.rollout.iteration_timeout_s, f"rewards of iteration {iteration}"
        )
        timings["reward"] = timings.get("reward", 0.0) + time.perf_counter() - start
        return chunks, rewards, latency

    def _with_progress(self, launched: Launched, desc: str, *, leave: bool) -> Iterator[Chunk]:
        """The round's chunks as they come, with a progress bar of samples (an agent's episode of several
        segments counted once) and tokens/s when the log is a terminal."""
        interactive = hasattr(self.log, "isatty") and self.log.isatty()
        partial = launched.trains_at is not None
        total = (
            self.cfg.rollout.prompts_per_iteration if partial else len(launched.indices)
        ) * self.cfg.rollout.n_samples
        tokens, start = 0, time.perf_counter()
        bar = tqdm(
            total=total,
            unit="sample",
            desc=desc,
            leave=leave,
            file=self.log,
            disable=not interactive,
            dynamic_ncols=True,
        )
        with bar:
            for chunk in launched.generation.chunks():
                tokens += chunk.summary.generated_tokens
                bar.update(chunk.summary.samples - chunk.summary.earlier_segments)
                bar.set_postfix(tok_s=f"{tokens / max(time.perf_counter() - start, 1e-9):.0f}")
                yield chunk

    def _say_short_once(self, iteration: int, kept: int, wanted: int, rounds: int) -> None:
        if kept < wanted and not self.said_short:
            self.said_short = True
            print(
                f"dynamic sampling: iteration {iteration} has {kept} of {wanted} prompts whose samples' rewards "
                f"differ after {rounds} rounds (rollout.dynamic_sampling.max_rounds); it trains on those, as "
                "later iterations will when this happens again",
                file=self.log,
                flush=True,
            )


PARTIAL_SPARE = 0.5  # partial rollouts: prompts in flight beyond an iteration's, as a fraction of them


def without_stale(chunks: list[Chunk], selection: Selection | None, oldest: int) -> tuple[Selection, int]:
    """The rows to train on: `selection`'s (all, without one), less those whose first token's version is older
    than `oldest`; and how many of the selected were left out for it."""
    rows, dropped = [], 0
    for c, chunk in enumerate(chunks):
        versions = np.asarray(chunk.summary.row_versions, dtype=np.int64)
        chosen = np.ones(len(versions), dtype=bool) if selection is None else selection.rows[c]
        fresh = versions >= oldest
        dropped += int((chosen & ~fresh).sum())
        rows.append(chosen & fresh)
    if not dropped:
        return selection, 0
    if selection is None:  # every group kept but for the stale rows
        return Selection(rows, len({i for c in chunks for i in c.summary.prompt_ids}), 0), dropped
    return Selection(rows, selection.kept, selection.filtered), dropped


class EnvironmentFailure(JobFailure):
    """More of an iteration's episodes than `env.max_error_fraction` ended on their environment's error."""


def check_episodes(cfg: EnvConfig, iteration: int, summaries) -> None:
    """EnvironmentFailure naming the environment and its first error when more than `env.max_error_fraction`
    of the iteration's episodes failed in it (each one alone just ends, `finish_reason: env_error`)."""
    errors = sum(s.env_errors for s in summaries)
    samples = sum(s.samples for s in summaries)
    if cfg.name is None or errors <= cfg.max_error_fraction * samples:
        return
    first = next(s.first_env_error for s in summaries if s.first_env_error)
    raise EnvironmentFailure(
        f"{errors} of {samples} episodes of iteration {iteration} failed in environment {cfg.name}, more than "
        f"env.max_error_fraction ({cfg.max_error_fraction:g}); the first: {first}"
    )
