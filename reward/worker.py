"""`RewardWorker`: scores a generation batch (Arrow columns) with the configured rules and reward
model, reading each sample's data record (reference answer, metadata) by its prompt id. A plain
class; the job wraps it in a Ray actor, and hands it the prompt records once, at spawn."""

from __future__ import annotations

import time

import pyarrow as pa

from reward.scorer import RewardModelScorer, RewardResult, RuleScorer, rule_component_names
from rollout.config import RewardConfig
from rollout.record import reward_batch

MODEL_COMPONENT = "reward_model"


def last_user_message(record) -> str:
    """What rules read as the prompt: the final user turn, without template markup."""
    return next((m.content for m in reversed(record.messages) if m.role == "user"), "")


def reward_components(cfg: RewardConfig) -> tuple[str, ...]:
    """The run's reward components, in archive order: each rule's, then the reward model's."""
    return (*rule_component_names(cfg.rules), *([MODEL_COMPONENT] if cfg.model is not None else []))


def check_reward_model(cfg: RewardConfig) -> None:
    """A reward model given as a local path must be a saved model there: found before any actor starts."""
    from pathlib import Path

    from rollout.config import ConfigError

    if cfg.model is None:
        return
    path = Path(cfg.model.path).expanduser()
    looks_local = cfg.model.path.startswith(("/", ".", "~")) or path.exists() or cfg.model.path.count("/") != 1
    if looks_local and not (path / "config.json").is_file():
        what = "does not exist" if not path.exists() else "holds no config.json (not a saved model)"
        raise ConfigError(f"reward.model.path: {cfg.model.path} {what}; point it at the model directory "
                          "`reward train` wrote (OUT/model)")


def spawn_reward_workers(cfg: RewardConfig, prompts: list) -> list:
    """The RewardWorker actors a job or `rollout generate` scores with; `prompts` are the data records."""
    import ray

    from rollout.console import actor_options

    actor = ray.remote(_RewardActor)
    records = ray.put(prompts)
    return [actor.options(num_cpus=cfg.num_cpus_per_worker, **actor_options(f"reward-{i}"))
            .remote(cfg, records, name=f"reward-{i}") for i in range(cfg.num_workers)]


class RewardWorker:
    def __init__(self, cfg: RewardConfig, prompts: list = (), *, name: str = "reward-0"):
        self.name = name
        self.cfg = cfg
        self.prompts = {record.prompt_id: record for record in prompts}
        self.components = reward_components(cfg)
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

    def score_batch(self, batch: pa.RecordBatch) -> tuple[pa.RecordBatch, dict[str, float]]:
        """The reward columns of a generation batch, row for row, and the seconds this call spent
        scoring it, in total and per rule (the caller adds them up per iteration)."""
        before = self.latency()
        ids, prompts, responses = (batch.column(name).to_pylist() for name in ("prompt_id", "prompt", "response"))
        rewards = reward_batch(self.score([(self.prompts[i], p, r) for i, p, r in zip(ids, prompts, responses)]),
                               self.components)
        return rewards, {name: seconds - before.get(name, 0.0) for name, seconds in self.latency().items()}

    def latency(self) -> dict[str, float]:
        """Cumulative scoring seconds: the whole call (`total`) and each rule."""
        return {"total": self.seconds, **self.rules.latency}


class _RewardActor(RewardWorker):
    """The Ray edge of a RewardWorker: its console output is filtered into its log first."""

    def __init__(self, *args, **kwargs):
        from rollout.console import route_actor_output

        route_actor_output()
        super().__init__(*args, **kwargs)
