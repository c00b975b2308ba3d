"""`RolloutWorker`: one engine, chunks of prompts in, generation batches (Arrow columns, no rewards
yet) out, one per chunk as it completes.

A plain class; `rollout.actors.rollout_workers` wraps it in a Ray actor. Every sample carries the version of the
weights that generated it. All of a call's chunks go into the engine together, so its batch stays
full across chunk boundaries, while each chunk is handed on (to scoring) as soon as it is done.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import math
import time
from collections.abc import Iterator

import msgspec
import pyarrow as pa

from contracts import storage
from contracts.config import EnvConfig, RolloutConfig, SamplingConfig
from contracts.rendering import PromptTask
from rollout.archive.columns import generation_batch
from rollout.generation.completions import stream_completions
from rollout.generation.engine import VLLMEngine
from rollout.generation.episodes import EpisodeRunner
from rollout.generation.partial import PartialRollouts, completions
from rollout.runtime.telemetry import record_environment, record_generation
from rollout.weight_sync.check import PROBE_IDS, Served
from rollout.weight_sync.wire import GroupAddress, SyncPlan


class GenerationSummary(msgspec.Struct):
    worker: str
    seconds: float
    samples: int
    generated_tokens: int  # the model's: an environment's tokens in an episode are not counted
    stopped: int  # samples that ended on a stop token or string (the rest hit max_tokens)
    policy_version: int
    turns: int = 0  # model turns, over the chunk's episodes (0: single completions)
    env_errors: int = 0  # episodes an environment's error or time-out ended
    first_env_error: str | None = None
    env_step_seconds: float = 0.0  # the environment calls' wall time, summed
    resumed_tokens: int = 0  # episodes' later turns: their prompts' tokens (the episode so far)
    cached_tokens: int = 0  # of those, the ones the engine's prefix cache served
    earlier_segments: int = 0  # rows of agents' episodes before their last segment: `samples` less these, episodes
    # Partial rollouts (`generate_partial`): which prompts the chunk holds, each row's version at its first
    # token, the newest version at any last token, the rows resumed after a weight load.
    prompt_ids: list[str] | None = None
    row_versions: list[int] | None = None
    last_version: int | None = None
    resumed_samples: int = 0
    # The engine's steps and sampled tokens so far, and its batch: how full its steps ran (benchmarks).
    engine_steps: int = 0
    engine_tokens: int = 0
    batch_seqs: int = 0


class RolloutWorker:
    def __init__(
        self,
        name: str,
        model_path: str,
        cfg: RolloutConfig,
        *,
        env: EnvConfig | None = None,
        dtype: str = "float32",
        seed: int = 0,
    ):
        """`env`: the environment section; with a `name`, every sample is an episode (`episodes.py`)."""
        self.name = name
        self.cfg = cfg
        self.version = 0
        self.loading = False
        episodes = env is not None and env.name is not None
        # An episode's later turns start with its earlier ones: their KV cache is kept and reused.
        self.engine = VLLMEngine(storage.fetch(model_path), cfg, dtype=dtype, seed=seed, prefix_caching=episodes)
        self.episodes = None
        if episodes:
            from rollout.environments.registry import environment_class

            env_class = environment_class(env.name)
            if getattr(env_class, "serves_agents", False):  # openai_agent: the agents call this worker's endpoint
                from rollout.generation.agents import AgentRunner

                self.episodes = AgentRunner(
                    self.engine, env, self.engine.tokenizer, worker=name, max_model_len=cfg.max_model_len
                )
            else:
                self.episodes = EpisodeRunner(self.engine, env_class, env, self.engine.tokenizer)
        self.partial = (
            PartialRollouts(self.engine, cfg.sampling, cfg.n_samples, lambda: self.version)
            if cfg.partial_rollouts and not episodes
            else None
        )

    def generate(
        self,
        chunks: list[list[PromptTask]],
        seeds: list[int | None],
        *,
        run_id: str,
        iteration: int,
        records: list[list] | None = None,
        sampling: SamplingConfig | None = None,
        n_samples: int | None = None,
    ) -> Iterator[tuple[int, pa.RecordBatch, GenerationSummary]]:
        """`n_samples` completions (or episodes, whose environments read `records`, the chunks' data records)
        per task of every chunk, all in the engine at once; yields (chunk index, generation batch, summary)
        as each chunk completes. Seeds should differ per chunk. `sampling`, `n_samples`: this call's, in place
        of the rollout's (an evaluation's)."""
        with self._engine_alone():  # partial rollouts' groups wait, cut, while this call has the engine
            yield from self._generate(chunks, seeds, run_id, iteration, records, sampling, n_samples)

    def _generate(self, chunks, seeds, run_id, iteration, records, sampling, n_samples):
        start = time.perf_counter()
        sampling = sampling or self.cfg.sampling
        n_samples = n_samples or self.cfg.n_samples
        ids = [[t.prompt_ids for t in chunk] for chunk in chunks]
        if self.episodes is not None:
            steps_before = len(self.episodes.env_seconds)
            resumed_before, cached_before = self.episodes.resumed_tokens, self.episodes.cached_tokens
            source = self.episodes.stream(list(zip(records, ids, seeds)), sampling, n_samples)
        else:
            source = stream_completions(self.engine, list(zip(ids, seeds)), sampling, n_samples)
        for index, outputs in source:
            batch = self._batch(chunks[index], outputs, run_id, iteration)
            samples = [c for chunk_samples in outputs for c in chunk_samples]
            rows = [row for c in samples for row in (*c.earlier_segments, c)]  # an agent's episode: its segments
            tokens = sum(len(c.token_ids) if c.mask is None else sum(c.mask) for c in rows)
            stopped = sum(c.finish_reason == "stop" for c in samples)
            seconds, start = time.perf_counter() - start, time.perf_counter()  # the engine's time since the last chunk
            record_generation(self.name, tokens, batch.num_rows, seconds, self.version)
            summary = GenerationSummary(
                self.name,
                seconds,
                batch.num_rows,
                tokens,
                stopped,
                self.version,
                engine_steps=self.engine.steps,
                engine_tokens=self.engine.generated_tokens,
                batch_seqs=self.engine.batch_seqs,
                earlier_segments=len(rows) - len(samples),
            )
            if self.episodes is not None:
                errors = [c.env_error for c in samples if c.env_error is not None]
                steps = self.episodes.env_seconds[steps_before:]
                steps_before = len(self.episodes.env_seconds)
                record_environment(self.name, steps, len(errors))
                summary = msgspec.structs.replace(
                    summary,
                    turns=sum(c.num_turns for c in samples),
                    env_errors=len(errors),
                    first_env_error=errors[0] if errors else None,
                    env_step_seconds=sum(steps),
                    resumed_tokens=self.episodes.resumed_tokens - resumed_before,
                    cached_tokens=self.episodes.cached_tokens - cached_before,
                )
                resumed_before, cached_before = self.episodes.resumed_tokens, self.episodes.cached_tokens
            yield index, batch, summary

    def generate_partial(
        self, tasks: list[PromptTask], seeds: list[int | None], *, quota: int, oldest: int, run_id: str, iteration: int
    ) -> Iterator[tuple[pa.RecordBatch, GenerationSummary]]:
        """Partial rollouts (`rollout.generation.partial`): add `tasks` to the worker's groups and yield
        (generation batch, summary) per chunk of completed groups until `quota` groups were handed out and
        none started before version `oldest` is left. Groups still running carry over to the next call."""
        size = max(1, min(self.cfg.max_chunk_prompts, math.ceil(max(quota, 1) / self.cfg.chunks_per_worker)))
        start = time.perf_counter()
        for groups in self.partial.take(tasks, seeds, quota, oldest, size):
            outputs = completions(self.engine, groups)
            batch = self._batch([g.task for g in groups], outputs, run_id, iteration)
            rows = [c for samples in outputs for c in samples]
            tokens = sum(len(c.token_ids) for c in rows)
            seconds, start = time.perf_counter() - start, time.perf_counter()
            record_generation(self.name, tokens, batch.num_rows, seconds, self.version)
            versions = [c.policy_version for c in rows]
            summary = GenerationSummary(
                self.name,
                seconds,
                batch.num_rows,
                tokens,
                sum(c.finish_reason == "stop" for c in rows),
                min(versions),
                prompt_ids=[g.task.prompt_id for g in groups],
                row_versions=versions,
                last_version=max(c.resumed_versions[-1] if c.resumed_versions else c.policy_version for c in rows),
                resumed_samples=sum(bool(c.resumed_at) for c in rows),
                engine_steps=self.engine.steps,
                engine_tokens=self.engine.generated_tokens,
                batch_seqs=self.engine.batch_seqs,
            )
            yield batch, summary

    def _batch(self, tasks: list[PromptTask], outputs, run_id: str, iteration: int) -> pa.RecordBatch:
        return generation_batch(
            tasks,
            outputs,
            run_id=run_id,
            iteration=iteration,
            policy_version=self.version,
            worker=self.name,
            generated_at=dt.datetime.now(dt.timezone.utc),
        )

    def _engine_alone(self):
        return self.partial.paused() if self.partial is not None else contextlib.nullcontext()

    def update_weights(self, version: int, weights: list[tuple[str, object]]) -> Served:
        """Load new policy weights (Hugging Face names)."""
        with self._engine_alone():
            self.loading = True
            try:
                self.engine.reload_weights(weights)
            finally:
                self.loading = False
            self.version = version
            return self.served()

    def progress(self) -> int | None:
        """Engine steps so far (rollout.stall); None while weights load, one call that reports nothing."""
        return None if self.loading else self.engine.steps

    def served(self) -> Served:
        with self._engine_alone():
            return Served(self.version, self.engine.probe_logprobs(list(PROBE_IDS)))

    def load_versioned(self, versioned: tuple[int, list[tuple[str, object]]]) -> Served:
        """`update_weights` with (version, weights) read together by the learner (`versioned_weights`)."""
        version, weights = versioned
        return self.update_weights(version, weights)

    def join_weight_group(self, address: GroupAddress, rank_offset: int) -> bool:
        """Every engine process joins the collective sync's group (rollout/weight_sync/receiver.py);
        False if the driver called it off."""
        return all(self.engine.llm.collective_rpc("open_weight_group", args=(address, rank_offset)))

    def receive_weights(self, version: int, plan: SyncPlan, sync: int) -> Served | None:
        """Receive and load the learner's broadcast; None if the sync was called off."""
        with self._engine_alone():
            self.loading = True
            try:
                received = all(self.engine.llm.collective_rpc("receive_weights", args=(plan, sync)))
            finally:
                self.loading = False
            if not received:
                return None
            self.engine.llm.reset_prefix_cache()
            self.version = version
            return self.served()

    def ready(self) -> str:
        return self.name

    def serving_version(self) -> int:
        return self.version
