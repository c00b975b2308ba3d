"""`RolloutWorker`: one engine, prompts in, rollout records (no rewards yet) out.

A plain class; `rollout.pool` wraps it in a Ray actor. Every record carries the version of the
weights that generated it.
"""

from __future__ import annotations

import datetime as dt
import time

import msgspec

from rollout.config import RolloutConfig
from rollout.engine import VLLMEngine
from rollout.record import RolloutRecord
from rollout.rendering import PromptTask
from rollout.telemetry import record_generation


class GenerationResult(msgspec.Struct):
    records: list[RolloutRecord]
    worker: str
    seconds: float
    generated_tokens: int


class RolloutWorker:
    def __init__(self, name: str, model_path: str, cfg: RolloutConfig, *, dtype: str = "float32", seed: int = 0):
        self.name = name
        self.cfg = cfg
        self.version = 0
        self.engine = VLLMEngine(model_path, cfg, dtype=dtype, seed=seed)

    def generate(self, tasks: list[PromptTask], *, run_id: str, iteration: int,
                 seed: int | None = None) -> GenerationResult:
        """`n_samples` completions per task. `seed` should differ per call, or samples repeat."""
        start = time.perf_counter()
        outputs = self.engine.generate([t.prompt_ids for t in tasks], self.cfg.sampling, self.cfg.n_samples,
                                       seed=seed)
        now = dt.datetime.now(dt.timezone.utc)
        records = [
            RolloutRecord(
                run_id=run_id, prompt_id=task.prompt_id, iteration=iteration, policy_version=self.version,
                sample_index=i, prompt=task.prompt, response=c.text, prompt_ids=task.prompt_ids,
                response_ids=c.token_ids, response_logprobs=c.logprobs, finish_reason=c.finish_reason,
                worker=self.name, generated_at=now,
            )
            for task, completions in zip(tasks, outputs)
            for i, c in enumerate(completions)
        ]
        tokens = sum(len(r.response_ids) for r in records)
        seconds = time.perf_counter() - start
        record_generation(self.name, tokens, len(records), seconds, self.version)
        return GenerationResult(records=records, worker=self.name, seconds=seconds, generated_tokens=tokens)

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
