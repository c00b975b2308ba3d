"""`RewardWorker`: scores a generation batch (Arrow columns) with the configured rules, reward model
and reward server, reading each sample's data record (reference answer, metadata) by its prompt id.
A plain class; the job wraps it in a Ray actor. The data records of a batch's prompts come with the
batch, so a worker holds no state but its scorers: Ray restarts a dead one and runs the lost call
again there."""

from __future__ import annotations

import math
import time

import pyarrow as pa
import pyarrow.compute as pc

from contracts import storage
from contracts.config import RewardConfig
from contracts.schema import reward_batch
from reward.remote import REMOTE_COMPONENT, RemoteScorer
from reward.scorer import RewardModelScorer, RewardResult, RuleScorer, rule_component_names

MODEL_COMPONENT = "reward_model"
RESTARTED = "restarted"  # in score_batch's seconds: 1 on the first call after a restart


def last_user_message(record) -> str:
    """What rules read as the prompt: the final user turn, without template markup."""
    return next((m.content for m in reversed(record.messages) if m.role == "user"), "")


def reward_components(cfg: RewardConfig) -> tuple[str, ...]:
    """The run's reward components, in archive order: each rule's, then the reward model's, then the
    reward server's."""
    return (
        *rule_component_names(cfg.rules),
        *([MODEL_COMPONENT] if cfg.model is not None else []),
        *([REMOTE_COMPONENT] if cfg.remote is not None else []),
    )


def wire_sample(record, response: str) -> dict:
    """One sample as the reward server reads it (reward/remote.py's wire format)."""
    return {
        "prompt": last_user_message(record),
        "response": response,
        "reference": record.reference,
        "metadata": record.metadata,
    }


class RewardWorker:
    def __init__(self, cfg: RewardConfig, *, name: str = "reward-0"):
        self.name = name
        self.cfg = cfg
        self.components = reward_components(cfg)
        self.rules = RuleScorer(cfg.rules, timeout_s=cfg.timeout_s, failed_value=cfg.failed_value)
        self.model = None
        if cfg.model is not None:
            path = storage.fetch(cfg.model.path)  # from the run's URI where this node cannot see the driver's disk
            self.model = RewardModelScorer(path, batch_size=cfg.model.batch_size)
        self.remote = RemoteScorer(cfg.remote) if cfg.remote is not None else None
        self.seconds = 0.0
        self.scored = 0  # samples whose rules ran; progress() adds model batches and server requests

    def progress(self) -> int:
        return (
            self.scored
            + (self.model.batches_done if self.model is not None else 0)
            + (self.remote.requests if self.remote is not None else 0)
        )

    def score(
        self, items: list[tuple[object, str, str]], response_tokens: list[int] | None = None
    ) -> list[RewardResult]:
        """One result per (record, rendered prompt, response), every component kept; `response_tokens`
        (each response's length in tokens) for the rules that read it."""
        start = time.perf_counter()
        pending = None
        if self.remote is not None:  # its requests go out first, to be answered while the rules and model score
            pending = self.remote.submit([wire_sample(rec, response) for rec, _, response in items])
        results = self.rules.score_batch(
            [(last_user_message(rec), response, rec) for rec, _, response in items], response_tokens
        )
        self.scored += len(items)
        if self.model is not None:
            scores = self.model.score([prompt + response for _, prompt, response in items])
            self._add(results, MODEL_COMPONENT, scores, self.cfg.model.weight)
        if pending is not None:
            self._add(results, REMOTE_COMPONENT, self.remote.gather(pending), self.cfg.remote.weight)
        self.seconds += time.perf_counter() - start
        return results

    def _add(self, results: list[RewardResult], name: str, scores: list[float], weight: float) -> None:
        """A component scored outside the rules, weighted into each total; NaN fails it, as in a rule."""
        for result, score in zip(results, scores):
            result.components[name] = float(score)
            if math.isnan(score):
                result.failed.append(name)
                result.total += self.cfg.failed_value
            else:
                result.total += weight * float(score)

    def score_batch(self, batch: pa.RecordBatch, records: list) -> tuple[pa.RecordBatch, dict[str, float]]:
        """The reward columns of a generation batch, row for row, and the seconds this call spent
        scoring it, in total and per rule (the caller adds them up per iteration). `records` are the
        data records of the batch's prompts (reference answers, metadata). An episode is scored on its
        final turn, the model's answer (`final_turn`; a batch without it, on `response`)."""
        before = self.latency()
        by_id = {record.prompt_id: record for record in records}
        scored = "final_turn" if "final_turn" in batch.schema.names else "response"
        ids, prompts, responses = (batch.column(name).to_pylist() for name in ("prompt_id", "prompt", scored))
        lengths = pc.list_value_length(batch.column("response_ids")).to_pylist() if self.rules.counts_tokens else None
        rewards = reward_batch(
            self.score([(by_id[i], p, r) for i, p, r in zip(ids, prompts, responses)], lengths), self.components
        )
        return rewards, {name: seconds - before.get(name, 0.0) for name, seconds in self.latency().items()}

    def close(self) -> None:
        self.rules.close()
        if self.remote is not None:
            self.remote.close()

    def latency(self) -> dict[str, float]:
        """Cumulative scoring seconds: the whole call (`total`), each rule and the server's requests
        (summed: they overlap)."""
        remote = {REMOTE_COMPONENT: self.remote.seconds} if self.remote is not None else {}
        return {"total": self.seconds, **self.rules.latency, **remote}
