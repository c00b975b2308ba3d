"""The rule scorer (weights, failures, timeouts, config errors) and the reward-model scorer."""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import pytest

from contracts.config import RuleSpec
from contracts.registry import Registry
from reward.rules import RULES
from reward.scorer import RewardModelScorer, RewardResult, RuleScorer, ScorerStuckError


@dataclass(frozen=True)
class Record:
    """The two attributes rules read from a PromptRecord."""

    reference: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)


def sleepy(prompt: str, response: str, record: Any, seconds: float = 10.0) -> float:
    """A rule slower than any timeout in these tests; the event lets a test end it early."""
    SLEEP_OVER.wait(seconds)
    return 1.0


def broken(prompt: str, response: str, record: Any) -> float:
    raise RuntimeError("this rule always fails")


def not_a_number(prompt: str, response: str, record: Any) -> float:
    return math.inf


SLEEP_OVER = threading.Event()
EXTRA = Registry("reward rule", "reward.rules[].name")  # the built-ins and these
for _name, _rule in [*RULES.items(), ("sleepy", sleepy), ("broken", broken), ("not_a_number", not_a_number)]:
    EXTRA.register(_name)(_rule)


@pytest.fixture(autouse=True)
def release_sleepers():
    SLEEP_OVER.clear()
    yield
    SLEEP_OVER.set()  # abandoned sleepers end with the test instead of holding pool threads


def scorer(*specs: RuleSpec, **kwargs: Any) -> RuleScorer:
    return RuleScorer(list(specs), timeout_s=kwargs.pop("timeout_s", 5.0), registry=EXTRA, **kwargs)


def test_weighted_total_and_components() -> None:
    s = scorer(
        RuleSpec(name="arithmetic", weight=2.0),
        RuleSpec(name="length", weight=0.5, params={"target": 1, "penalty_per_unit": 0.1}),
    )
    result = s.score("12+7=", "19 !", Record())
    assert result.components == {"arithmetic": 1.0, "length": pytest.approx(-0.3)}
    assert result.total == pytest.approx(2.0 * 1.0 + 0.5 * -0.3)
    assert result.failed == []


def test_overlong_reads_each_response_token_count_and_the_rest_never_see_it() -> None:
    s = scorer(
        RuleSpec(name="length", params={"target": 100}),
        RuleSpec(name="overlong", params={"max_tokens": 10, "buffer_tokens": 4}),
    )
    results = s.score_batch([("", "a", Record()), ("", "b", Record()), ("", "c", Record())], response_tokens=[6, 8, 12])
    assert [r.components["overlong"] for r in results] == [0.0, pytest.approx(-0.5), -1.0]
    assert s.counts_tokens and not scorer(RuleSpec(name="length")).counts_tokens


def test_a_reward_worker_counts_the_response_tokens_of_the_batch() -> None:
    import pyarrow as pa

    from contracts.config import RewardConfig
    from contracts.formats import Message, PromptRecord
    from reward.worker import RewardWorker

    worker = RewardWorker(RewardConfig(rules=[RuleSpec(name="overlong", params={"max_tokens": 4, "buffer_tokens": 2})]))
    batch = pa.record_batch(
        {"prompt_id": ["a", "a"], "prompt": ["p", "p"], "response": ["x", "y"], "response_ids": [[1, 2], [1, 2, 3]]}
    )
    rewards, _ = worker.score_batch(batch, [PromptRecord("a", [Message("user", "p")], None, {}, "t:1")])
    assert rewards.column("reward").to_pylist() == [0.0, -0.5]
    worker.close()


def test_repeated_rules_get_numbered_names() -> None:
    s = scorer(
        RuleSpec(name="format"),
        RuleSpec(name="format", params={"pattern": "x"}),
        RuleSpec(name="format", params={"pattern": "19"}),
    )
    result = s.score("", "19", Record())
    assert list(result.components) == ["format", "format#1", "format#2"]
    assert result.components == {"format": 1.0, "format#1": 0.0, "format#2": 1.0}
    assert result.total == 2.0


def test_a_failing_component_is_nan_and_counted() -> None:
    s = scorer(RuleSpec(name="arithmetic", weight=3.0), RuleSpec(name="similarity"), failed_value=-0.5)
    # No reference: similarity raises, and arithmetic reads the answer from the prompt.
    result = s.score("1+1=", "2", Record())
    assert result.failed == ["similarity"]
    assert math.isnan(result.components["similarity"])
    assert result.components["arithmetic"] == 1.0
    assert result.total == pytest.approx(3.0 - 0.5)  # failed_value is not weighted
    assert s.failures == {"arithmetic": 0, "similarity": 1}


def test_failures_and_latency_accumulate() -> None:
    s = scorer(RuleSpec(name="broken"), RuleSpec(name="not_a_number"), RuleSpec(name="format"))
    results = s.score_batch([("", "1", None), ("", "x", None)])
    assert [r.failed for r in results] == [["broken", "not_a_number"]] * 2
    assert [r.components["format"] for r in results] == [1.0, 0.0]
    assert [r.total for r in results] == [1.0, 0.0]
    assert s.failures == {"broken": 2, "not_a_number": 2, "format": 0}
    assert set(s.latency) == {"broken", "not_a_number", "format"}
    assert all(seconds > 0 for seconds in s.latency.values())


def test_a_slow_rule_times_out_and_scoring_goes_on() -> None:
    s = scorer(RuleSpec(name="sleepy"), RuleSpec(name="arithmetic"), timeout_s=0.2)
    result = s.score("2+2=", "4", Record())
    # Failed, not scored: had the scorer waited for the sleeping rule, it would have had its value.
    assert result.failed == ["sleepy"]
    assert result.components["arithmetic"] == 1.0
    assert s.failures["sleepy"] == 1
    assert s.latency["sleepy"] >= 0.2


def test_a_catastrophic_regex_times_out() -> None:
    # The pattern's own limit (30 s) is longer than the scorer's: the scorer gives up first.
    spec = RuleSpec(name="safety", params={"blocklist": [], "patterns": ["^(a|a)+$"], "regex_timeout_s": 30.0})
    s = scorer(spec, RuleSpec(name="length"), timeout_s=0.3, max_abandoned=2)
    result = s.score("", "a" * 40 + "!", None)
    assert result.failed == ["safety"]  # given up at the scorer's limit: the match itself would still run
    assert result.components["length"] == 0.0


def test_abandoned_calls_are_bounded() -> None:
    s = scorer(RuleSpec(name="sleepy"), timeout_s=0.05, max_abandoned=2)
    assert s.score("", "", None).failed == ["sleepy"]
    assert s.score("", "", None).failed == ["sleepy"]
    with pytest.raises(ScorerStuckError, match="2 rule calls ran past"):
        s.score("", "", None)
    SLEEP_OVER.set()  # once the abandoned calls end, the scorer takes work again
    deadline = time.monotonic() + 10.0
    while time.monotonic() < deadline:
        try:
            assert s.score("", "", None).failed == []
            break
        except ScorerStuckError:
            time.sleep(0.01)
    else:
        pytest.fail("the scorer stayed stuck after its abandoned calls ended")
    s.close()


def test_unknown_rule_is_rejected_at_construction() -> None:
    with pytest.raises(ValueError, match="unknown reward rule 'bleu'; known: arithmetic"):
        RuleScorer([RuleSpec(name="bleu")], timeout_s=1.0)


def test_unknown_param_is_rejected_at_construction() -> None:
    with pytest.raises(ValueError, match="reward rule 'length' has no parameter 'colour'"):
        RuleScorer([RuleSpec(name="length", params={"colour": "red"})], timeout_s=1.0)


def test_bad_param_value_is_rejected_at_construction() -> None:
    with pytest.raises(ValueError, match=r"invalid regular expression '\['"):
        RuleScorer([RuleSpec(name="format", params={"pattern": "["})], timeout_s=1.0)


def test_no_rules_scores_zero() -> None:
    assert RuleScorer([], timeout_s=1.0).score("", "", None) == RewardResult(total=0.0, components={}, failed=[])


def test_bad_settings() -> None:
    with pytest.raises(ValueError, match="timeout_s"):
        RuleScorer([], timeout_s=0)
    with pytest.raises(ValueError, match="max_abandoned"):
        RuleScorer([], timeout_s=1.0, max_abandoned=0)


def test_default_config_rules() -> None:
    from contracts.config import RewardConfig

    cfg = RewardConfig()
    s = RuleScorer(cfg.rules, timeout_s=cfg.timeout_s, failed_value=cfg.failed_value)
    assert s.score("3+4=", "7", None).total == 1.0
    assert s.score("3+4=", "8", None).total == 0.0


# --- the reward model ---------------------------------------------------------------------------

TEXTS = [
    "<s><|user|>1+2=\n<|assistant|>3</s>",
    "<s><|user|>What is 4 plus 5?\n<|assistant|>The answer is 9.</s>",
    "<s><|user|>7+8=\n<|assistant|>14</s>",
    "the sum",
    "<s><|user|>please tell me how many apples are in the basket and the total number\n<|assistant|>12",
]


@pytest.fixture(scope="module")
def reward_model_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tiny random-weight Llama sequence classifier with one label, saved like `reward train` does."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

    from contracts.builtin_model import build_tiny_llama

    base = build_tiny_llama()
    tokenizer = AutoTokenizer.from_pretrained(base)
    config = LlamaConfig.from_pretrained(base)
    config.num_labels = 1
    config.pad_token_id = tokenizer.pad_token_id
    torch.manual_seed(0)
    model = LlamaForSequenceClassification(config)
    torch.nn.init.normal_(model.score.weight, std=0.1)  # spread the scores so texts tell apart
    out = tmp_path_factory.mktemp("reward-model")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return str(out)


def test_reward_model_scores(reward_model_dir: str) -> None:
    scores = RewardModelScorer(reward_model_dir, batch_size=2, device="cpu").score(TEXTS)
    assert len(scores) == len(TEXTS)
    assert all(isinstance(s, float) and math.isfinite(s) for s in scores)
    assert len({round(s, 6) for s in scores}) == len(TEXTS)  # different texts, different scores
    assert RewardModelScorer(reward_model_dir, batch_size=2, device="cpu").score(TEXTS) == scores


def test_reward_model_is_batch_size_invariant(reward_model_dir: str) -> None:
    one = RewardModelScorer(reward_model_dir, batch_size=1, device="cpu").score(TEXTS)
    eight = RewardModelScorer(reward_model_dir, batch_size=8, device="cpu").score(TEXTS)
    # With batch 8 the short texts are padded; the score must still come from their last real token.
    assert eight == pytest.approx(one, abs=1e-5)


def test_reward_model_keeps_order(reward_model_dir: str) -> None:
    rm = RewardModelScorer(reward_model_dir, batch_size=3, device="cpu")
    forward = rm.score(TEXTS)
    assert rm.score(TEXTS[::-1]) == pytest.approx(forward[::-1], abs=1e-5)
    assert rm.score([]) == []


def test_reward_model_truncates_the_beginning(reward_model_dir: str) -> None:
    long_prefix = "the " * 100 + TEXTS[0]
    rm = RewardModelScorer(reward_model_dir, batch_size=1, device="cpu", max_length=8)
    full = RewardModelScorer(reward_model_dir, batch_size=1, device="cpu")
    # Both keep the same last 8 tokens, so both see the same end of the response.
    assert rm.score([long_prefix]) == pytest.approx(rm.score(["the " * 3 + TEXTS[0]]), abs=1e-5)
    assert full.score([long_prefix]) != pytest.approx(rm.score([long_prefix]), abs=1e-5)


def test_reward_model_rejects_empty_text(reward_model_dir: str) -> None:
    with pytest.raises(ValueError, match="no tokens"):
        RewardModelScorer(reward_model_dir, device="cpu").score(["fine", ""])


def test_reward_model_rejects_a_causal_lm(tmp_path) -> None:
    from contracts.builtin_model import build_tiny_llama

    # The tiny policy saved as a causal LM loads as a classifier with the default two labels.
    with pytest.raises(ValueError, match="one output label"):
        RewardModelScorer(build_tiny_llama(), device="cpu")
