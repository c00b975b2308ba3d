"""The reward rules' registry: the one list of built-in names, lookup by name, params checked at start-up."""

from __future__ import annotations

from typing import Any

import pytest

from reward import rules
from reward.rule_params import check_params


def test_the_registry_is_the_one_list_of_built_in_names() -> None:
    from contracts.config import ConfigError, RewardConfig, RuleSpec
    from reward.checks import check_reward_config

    assert set(rules.RULES) == {
        "arithmetic",
        "similarity",
        "safety",
        "format",
        "length",
        "overlong",
        "reasoning_gym",
        "math",
    }
    limits = {"overlong": {"max_tokens": 64}}  # a job fills it in at load
    check_reward_config(RewardConfig(rules=[RuleSpec(name=name, params=limits.get(name, {})) for name in rules.RULES]))
    with pytest.raises(ConfigError) as e:
        check_reward_config(RewardConfig(rules=[RuleSpec(name="length"), RuleSpec(name="nonsense")]))
    assert str(e.value) == (
        "reward.rules.1.name: unknown reward rule 'nonsense'; known: arithmetic, similarity, safety, format, "
        "length, overlong, reasoning_gym, math, or your own as package.module:function"
    )
    # `rollout config --explain` names every built-in, read from the registry (no second list of them).
    from contracts.config.load import explain
    from rollout.commands import registered_names

    (line,) = [line for line in explain(registered=registered_names()) if line.startswith("reward.rules =")]
    assert line.endswith(f"Registered: {', '.join(rules.RULES)}."), line


def test_a_rule_is_looked_up_by_name_and_a_name_registered_twice_is_refused() -> None:
    assert rules.RULES.lookup("length") is rules.length
    with pytest.raises(
        ValueError, match="^reward.rules\\[\\].name: unknown reward rule 'bleu'; known: arithmetic, similarity"
    ):
        rules.RULES.lookup("bleu")
    with pytest.raises(ValueError, match="reward rule 'length' is registered twice"):
        rules.RULES.register("length")(lambda prompt, response, record: 0.0)
    assert rules.RULES.lookup("length") is rules.length


def test_rules_accept_a_real_prompt_record() -> None:
    from contracts import formats

    record = formats.PromptRecord(prompt_id="p", messages=[], reference="19", metadata={}, source="x:1")
    assert rules.arithmetic("12+7=", "19", record) == 1.0
    assert rules.similarity("", "19", record) == 1.0


@pytest.mark.parametrize(
    "name, params, message",
    [
        ("format", {"colour": 1}, "reward rule 'format' has no parameter 'colour'"),
        ("format", {"full": "yes"}, "parameter 'full' must be true or false"),
        ("arithmetic", {"tolerance": "1e-6"}, "must be a number.*write 1.0e-6"),
        ("safety", {"blocklist": "kill"}, "parameter 'blocklist' must be a list"),
        ("safety", {"patterns": ["("]}, r"invalid regular expression '\('"),
        ("similarity", {"method": "bleu"}, "unknown method"),
        ("length", {"unit": "tokens"}, "unknown unit"),
        ("arithmetic", {"tolerance": -1.0}, "tolerance must be >= 0"),
    ],
)
def test_check_params_rejects(name: str, params: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        check_params(name, rules.RULES[name], params)


def test_check_params_accepts_good_params() -> None:
    check_params("safety", rules.safety, {"blocklist": ["a"], "patterns": [r"\d+"], "penalty": -2})
    check_params("length", rules.length, {"target": 5, "unit": "words", "max_penalty": 0.5})
