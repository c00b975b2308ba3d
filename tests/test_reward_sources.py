"""Reward sources (`reward.sources`): the worker loops over the configured ones, and a fourth source is
one registered class."""

from __future__ import annotations

import math

import pyarrow as pa
import pytest

from contracts.config import RewardConfig, RuleSpec
from contracts.formats import Message, PromptRecord
from contracts.registry import Entry
from reward.scorer import RewardResult
from reward.sources import REWARD_SOURCES, RewardSource
from reward.worker import RewardWorker, reward_components


def test_the_built_in_sources_in_archive_order() -> None:
    assert REWARD_SOURCES.names() == ("rules", "model", "remote", "agent_weight")
    assert reward_components(RewardConfig(rules=[RuleSpec(name="length"), RuleSpec(name="length")])) == (
        "length",
        "length#1",
    )


def test_a_fourth_source_is_one_class_begun_before_any_is_finished(monkeypatch) -> None:
    events: list[str] = []

    class Shouting(RewardSource):
        """Scores a response by its exclamation marks; NaN where it has none."""

        def __init__(self, cfg: RewardConfig):
            super().__init__(cfg)
            self.calls = 0

        @staticmethod
        def configured(cfg: RewardConfig) -> bool:
            return True

        @staticmethod
        def component_names(cfg: RewardConfig) -> tuple[str, ...]:
            return ("shouting",)

        def begin(self, samples):
            events.append("shouting begun")

            def finish() -> list[RewardResult]:
                events.append("shouting finished")
                self.calls += 1
                counts = [s.response.count("!") for s in samples]
                return [
                    RewardResult(total=float(n), components={"shouting": float(n)}, failed=[])
                    if n
                    else RewardResult(
                        total=self.cfg.failed_value, components={"shouting": math.nan}, failed=["shouting"]
                    )
                    for n in counts
                ]

            return finish

        def progress(self) -> int:
            return self.calls

        def latency(self) -> dict[str, float]:
            return {"shouting": 0.5}

    monkeypatch.setattr(REWARD_SOURCES, "_entries", dict(REWARD_SOURCES._entries))  # the test's entry goes with it
    REWARD_SOURCES.register("shouting")(Shouting)
    real_rules = REWARD_SOURCES["rules"]

    class LoggedRules(real_rules):
        def begin(self, samples):
            events.append("rules begun")
            finish = super().begin(samples)
            return lambda: (events.append("rules finished"), finish())[1]

    monkeypatch.setitem(REWARD_SOURCES._entries, "rules", Entry("rules", LoggedRules, {}))

    cfg = RewardConfig(rules=[RuleSpec(name="arithmetic")], failed_value=-1.0)
    worker = RewardWorker(cfg)
    assert worker.components == ("arithmetic", "shouting")
    record = PromptRecord("a", [Message("user", "1+1=")], "2", {}, "t:1")
    batch = pa.record_batch({"prompt_id": ["a", "a"], "prompt": ["<|user|>1+1="] * 2, "response": ["2!!", "3"]})
    rewards, seconds = worker.score_batch(batch, [record])
    assert events == ["rules begun", "shouting begun", "rules finished", "shouting finished"]
    assert rewards.column("reward").to_pylist() == [3.0, -1.0]
    assert rewards.column("reward_components").to_pylist() == [
        {"arithmetic": 1.0, "shouting": 2.0},
        {"arithmetic": 0.0, "shouting": pytest.approx(math.nan, nan_ok=True)},
    ]
    assert seconds["shouting"] == 0.0 and set(seconds) == {"total", "arithmetic", "shouting"}
    assert worker.progress() == 2 + 1  # the rules' samples, the fourth source's calls
    worker.close()
