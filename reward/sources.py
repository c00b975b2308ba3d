"""Reward sources: what a `RewardWorker` adds up into each sample's reward, one class per source.

A source is built from the `reward` section when its part of it is set (`configured`), names the
reward components it scores into (`component_names`, read by the driver for the archive's columns
before any worker starts), and scores a batch in two steps: `begin(samples)` starts the work and
returns `finish`, which gives one `RewardResult` per sample (its components, weighted total and failed
components). The worker begins every source before it finishes any, so a source that waits on
others (a reward server) has its requests out while the rest score. `progress` is a count a stall
watch sees move, `latency` cumulative seconds by name, `close` lets go of threads and connections.

`REWARD_SOURCES` holds them by the `reward` field that configures each, in the order their components
are archived: the rules, then the reward model, then the reward server, then an agent's own reward. A fourth source is one class
here, registered, and the config field that sets it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import msgspec

from contracts import storage
from contracts.config import RewardConfig
from contracts.registry import Registry
from reward.remote import REMOTE_COMPONENT, RemoteScorer
from reward.scorer import RewardModelScorer, RewardResult, RuleScorer, rule_component_names

MODEL_COMPONENT = "reward_model"


class Sample(msgspec.Struct, frozen=True):
    """One completion to score: the data record its prompt came from (reference answer, metadata), the
    rendered prompt, the response and, where a source counts them, the response's length in tokens; for an
    agent's episode (`openai_agent`), the reward its function returned (None: it returned none)."""

    record: Any
    prompt: str
    response: str
    response_tokens: int | None = None
    agent_reward: float | None = None


def last_user_message(record: Any) -> str:
    """What rules and a reward server read as the prompt: the final user turn, without template markup."""
    return next((m.content for m in reversed(record.messages) if m.role == "user"), "")


class RewardSource:
    """The interface every source keeps; see the module docstring for the calls and their order."""

    counts_tokens = False  # whether `Sample.response_tokens` must be filled in for it

    def __init__(self, cfg: RewardConfig):
        self.cfg = cfg

    @staticmethod
    def configured(cfg: RewardConfig) -> bool:
        raise NotImplementedError

    @staticmethod
    def component_names(cfg: RewardConfig) -> tuple[str, ...]:
        raise NotImplementedError

    def begin(self, samples: Sequence[Sample]) -> Callable[[], list[RewardResult]]:
        raise NotImplementedError

    def progress(self) -> int:
        return 0

    def latency(self) -> dict[str, float]:
        return {}

    def close(self) -> None:
        pass


REWARD_SOURCES: Registry[type[RewardSource]] = Registry("reward source", "reward")


@REWARD_SOURCES.register("rules")
class Rules(RewardSource):
    """`reward.rules`, scored by a `RuleScorer` (each rule under the scorer's time limit); always built,
    so that its count of samples scored moves even with no rules."""

    def __init__(self, cfg: RewardConfig):
        super().__init__(cfg)
        self.scorer = RuleScorer(cfg.rules, timeout_s=cfg.timeout_s, failed_value=cfg.failed_value)
        self.counts_tokens = self.scorer.counts_tokens
        self.scored = 0

    @staticmethod
    def configured(cfg: RewardConfig) -> bool:
        return True

    @staticmethod
    def component_names(cfg: RewardConfig) -> tuple[str, ...]:
        return tuple(rule_component_names(cfg.rules))

    def begin(self, samples: Sequence[Sample]) -> Callable[[], list[RewardResult]]:
        def finish() -> list[RewardResult]:
            results = self.scorer.score_batch(
                [(last_user_message(s.record), s.response, s.record) for s in samples],
                [s.response_tokens for s in samples] if self.counts_tokens else None,
            )
            self.scored += len(samples)
            return results

        return finish

    def progress(self) -> int:
        return self.scored

    def latency(self) -> dict[str, float]:
        return dict(self.scorer.latency)

    def close(self) -> None:
        self.scorer.close()


@REWARD_SOURCES.register("model")
class RewardModel(RewardSource):
    """`reward.model`: a sequence classifier `reward train` saved, scoring rendered prompt + response."""

    def __init__(self, cfg: RewardConfig):
        super().__init__(cfg)
        path = storage.fetch(cfg.model.path)  # from the run's URI where this node cannot see the driver's disk
        self.scorer = RewardModelScorer(path, batch_size=cfg.model.batch_size)

    @staticmethod
    def configured(cfg: RewardConfig) -> bool:
        return cfg.model is not None

    @staticmethod
    def component_names(cfg: RewardConfig) -> tuple[str, ...]:
        return (MODEL_COMPONENT,)

    def begin(self, samples: Sequence[Sample]) -> Callable[[], list[RewardResult]]:
        def finish() -> list[RewardResult]:
            scores = self.scorer.score([s.prompt + s.response for s in samples])
            return weighted(MODEL_COMPONENT, scores, self.cfg.model.weight, self.cfg.failed_value)

        return finish

    def progress(self) -> int:
        return self.scorer.batches_done


@REWARD_SOURCES.register("remote")
class RewardServer(RewardSource):
    """`reward.remote`: a reward server of the user's over HTTP (`reward.remote`'s wire format); its
    requests go out in `begin`, to be answered while the other sources score."""

    def __init__(self, cfg: RewardConfig):
        super().__init__(cfg)
        self.scorer = RemoteScorer(cfg.remote)

    @staticmethod
    def configured(cfg: RewardConfig) -> bool:
        return cfg.remote is not None

    @staticmethod
    def component_names(cfg: RewardConfig) -> tuple[str, ...]:
        return (REMOTE_COMPONENT,)

    def begin(self, samples: Sequence[Sample]) -> Callable[[], list[RewardResult]]:
        pending = self.scorer.submit([wire_sample(s.record, s.response) for s in samples])
        return lambda: weighted(
            REMOTE_COMPONENT, self.scorer.gather(pending), self.cfg.remote.weight, self.cfg.failed_value
        )

    def progress(self) -> int:
        return self.scorer.requests

    def latency(self) -> dict[str, float]:
        return {REMOTE_COMPONENT: self.scorer.seconds}  # summed over requests: they overlap

    def close(self) -> None:
        self.scorer.close()


AGENT_COMPONENT = "agent"


@REWARD_SOURCES.register("agent_weight")
class AgentReward(RewardSource):
    """`reward.agent_weight`: the reward an `openai_agent` episode's agent function returned, as component
    `agent` (no component where it returned None)."""

    @staticmethod
    def configured(cfg: RewardConfig) -> bool:
        return cfg.agent_weight is not None

    @staticmethod
    def component_names(cfg: RewardConfig) -> tuple[str, ...]:
        return (AGENT_COMPONENT,)

    def begin(self, samples: Sequence[Sample]) -> Callable[[], list[RewardResult]]:
        def finish() -> list[RewardResult]:
            return [
                RewardResult(total=0.0, components={}, failed=[])
                if s.agent_reward is None
                else weighted(AGENT_COMPONENT, [s.agent_reward], self.cfg.agent_weight, self.cfg.failed_value)[0]
                for s in samples
            ]

        return finish


def wire_sample(record: Any, response: str) -> dict:
    """One sample as the reward server reads it (reward/remote.py's wire format)."""
    return {
        "prompt": last_user_message(record),
        "response": response,
        "reference": record.reference,
        "metadata": record.metadata,
    }


def weighted(name: str, scores: Sequence[float], weight: float, failed_value: float) -> list[RewardResult]:
    """One component scored outside the rules, weighted into each total; NaN fails it, as in a rule
    (the total then takes `failed_value`, unweighted)."""
    results = []
    for score in scores:
        score = float(score)
        if math.isnan(score):
            results.append(RewardResult(total=failed_value, components={name: score}, failed=[name]))
        else:
            results.append(RewardResult(total=weight * score, components={name: score}, failed=[]))
    return results
