"""`RolloutWorker`: one engine, prompts in, a generation batch (Arrow columns, no rewards yet) out.

A plain class; `rollout.pool` wraps it in a Ray actor. Every sample carries the version of the
weights that generated it. `generate` returns the batch and a small summary separately, so the
driver can read the summary while the batch goes from the object store to the reward workers,
the learner and the archive without passing through it.
"""

from __future__ import annotations

import datetime as dt
import time

import msgspec
import pyarrow as pa

from rollout.columns import generation_batch
from rollout.config import RolloutConfig
from rollout.engine import VLLMEngine
from rollout.rendering import PromptTask
from rollout.telemetry import record_generation


class GenerationSummary(msgspec.Struct):
    worker: str
    seconds: float
    samples: int
    generated_tokens: int
    stopped: int  # samples that ended on a stop token or string (the rest hit max_tokens)
    policy_version: int


class RolloutWorker:
    def __init__(self, name: str, model_path: str, cfg: RolloutConfig, *, dtype: str = "float32", seed: int = 0):
        self.name = name
        self.cfg = cfg
        self.version = 0
        self.engine = VLLMEngine(model_path, cfg, dtype=dtype, seed=seed)

    def generate(self, tasks: list[PromptTask], *, run_id: str, iteration: int,
                 seed: int | None = None) -> tuple[pa.RecordBatch, GenerationSummary]:
        """`n_samples` completions per task. `seed` should differ per call, or samples repeat."""
        start = time.perf_counter()
        outputs = self.engine.generate([t.prompt_ids for t in tasks], self.cfg.sampling, self.cfg.n_samples,
                                       seed=seed)
        batch = generation_batch(tasks, outputs, run_id=run_id, iteration=iteration, policy_version=self.version,
                                 worker=self.name, generated_at=dt.datetime.now(dt.timezone.utc))
        tokens = sum(len(c.token_ids) for samples in outputs for c in samples)
        stopped = sum(c.finish_reason == "stop" for samples in outputs for c in samples)
        seconds = time.perf_counter() - start
        record_generation(self.name, tokens, batch.num_rows, seconds, self.version)
        return batch, GenerationSummary(self.name, seconds, batch.num_rows, tokens, stopped, self.version)

    def update_weights(self, version: int, weights: list[tuple[str, object]]) -> int:
        """Load new policy weights (Hugging Face names); returns the version now served."""
        self.engine.reload_weights(weights)
        self.version = version
        return version

    def init_weight_group(self, host: str, port: int, rank: int, world_size: int) -> None:
        """GPU only: join the learner's NCCL group (see rollout.weight_sync)."""
        self.engine.llm.collective_rpc("init_weight_group", args=(host, port, rank, world_size))

    def receive_weights(self, version: int, specs: list[tuple[str, str, tuple[int, ...]]]) -> int:
        """GPU only: receive the learner's NCCL broadcast of new weights."""
        self.engine.llm.collective_rpc("receive_weights", args=(specs,))
        self.engine.llm.reset_prefix_cache()
        self.version = version
        return version

    def ready(self) -> str:
        return self.name
