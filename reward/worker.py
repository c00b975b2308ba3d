"""`RewardWorker`: scores (record, rendered prompt, response) items with the configured rules and
reward model. A plain class; the job wraps it in a Ray actor."""

from __future__ import annotations

import time

from reward.scorer import RewardModelScorer, RewardResult, RuleScorer
from rollout.config import RewardConfig

MODEL_COMPONENT = "reward_model"


def last_user_message(record) -> str:
    """What rules read as the prompt: the final user turn, without template markup."""
    return next((m.content for m in reversed(record.messages) if m.role == "user"), "")


def apply_rewards(records, results: list[RewardResult]) -> None:
    """Write each result's total and components into its rollout record."""
    for record, result in zip(records, results, strict=True):
        record.reward = result.total
        record.reward_components = result.components


def spawn_reward_workers(cfg: RewardConfig) -> list:
    """The RewardWorker actors a job or `rollout generate` scores with."""
    import ray

    actor = ray.remote(RewardWorker).options(num_cpus=cfg.num_cpus_per_worker)
    return [actor.remote(cfg, name=f"reward-{i}") for i in range(cfg.num_workers)]


class RewardWorker:
    def __init__(self, cfg: RewardConfig, *, name: str = "reward-0"):
        self.name = name
        self.cfg = cfg
        self.rules = RuleScorer(cfg.rules, timeout_s=cfg.timeout_s, failed_value=cfg.failed_value)
        self.model = None
        if cfg.model is not None:
            self.model = RewardModelScorer(cfg.model.path, batch_size=cfg.model.batch_size)
        self.seconds = 0.0

    def score(self, items: list[tuple[object, str, str]]) -> list[RewardResult]:
        """One result per (record, rendered prompt, response), every component kept."""
        start = time.perf_counter()
        results = self.rules.score_batch([(last_user_message(rec), response, rec) for rec, _, response in items])
        if self.model is not None:
            scores = self.model.score([prompt + response for _, prompt, response in items])
            for result, score in zip(results, scores):
                result.components[MODEL_COMPONENT] = float(score)
                result.total += self.cfg.model.weight * float(score)
        self.seconds += time.perf_counter() - start
        return results

    def latency(self) -> dict[str, float]:
        """Cumulative scoring seconds: the whole call (`total`) and each rule."""
        return {"total": self.seconds, **self.rules.latency}
