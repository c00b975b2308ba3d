"""The built-in environments: the calculator tool (its parser never runs what the model wrote) and the
conversation played turn by turn with rewards against each turn's reference."""

from __future__ import annotations

import sys

import pytest

from contracts.config import ConfigError, EnvConfig
from contracts.environment import StepResult
from contracts.formats import Message, parse_prompt
from rollout.environments.calculator import MAX_EXPRESSION_CHARS, Calculator, format_number
from rollout.environments.conversation import Conversation
from rollout.environments.registry import check_environment

# --- calculator --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "turn, value",
    [
        ("<calc>123+456</calc>", "579"),
        ("Let me add. <calc> 17 * 23 </calc>", "391"),
        ("<calc>2*(3+4)-5</calc>", "9"),
        ("<calc>(1+2)*(3+4)/7</calc>", "3"),
        ("<calc>10/4</calc>", "2.5"),
        ("<calc>1/3</calc>", "0.333333333333"),
        ("<calc>5-12</calc>", "-7"),
        ("<calc>0.1+0.2</calc>", "0.3"),
        ("<calc>-(-3)</calc>", "3"),
        ("<calc>12*34", "408"),  # unclosed at the end of the turn: generation stopped at `</calc>`
    ],
)
def test_the_calculator_answers_a_call_with_its_value(turn, value):
    env = Calculator()
    assert env.reset(None) is None
    result = env.step(turn)
    assert result == StepResult(
        observation=f"<result>{value}</result>",
        reward=None,
        done=False,
        info={"tool_call": result.info["tool_call"], "error": False},
    )
    assert result.info["tool_call"] == turn.partition("<calc>")[2].partition("</calc>")[0].strip()


@pytest.mark.parametrize(
    "expression, reason",
    [
        ("7/(3-3)", "error: division by zero"),
        ("2+", "error: expression ends too early"),
        ("two plus two", "error: unexpected character 't' at position 0"),
        ("", "error: empty expression"),
        ("1e5", "error: unexpected character 'e' at position 1"),
        ("2**3", "error: expected a number or '(' but found '*'"),
        ("1" * (MAX_EXPRESSION_CHARS + 1), f"error: expression longer than {MAX_EXPRESSION_CHARS} characters"),
    ],
)
def test_what_has_no_value_is_an_error_the_model_can_read(expression, reason):
    result = Calculator().step(f"<calc>{expression}</calc>")
    assert result.observation == f"<result>{reason}</result>"
    assert not result.done and result.reward is None and result.info == {"tool_call": expression, "error": True}


@pytest.mark.parametrize(
    "attack",
    [
        "__import__('os').system('touch PWNED')",
        "open('PWNED', 'w').write('x')",
        "exec(\"open('PWNED','w')\")",
        "1+1; import os",
        "(lambda: 1)()",
    ],
)
def test_code_the_model_writes_is_answered_with_an_error_and_never_run(attack, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = Calculator().step(f"<calc>{attack}</calc>")
    assert result.observation.startswith("<result>error: ") and result.info["error"] is True
    assert list(tmp_path.iterdir()) == []  # nothing was written: the text was parsed, not run


def test_a_turn_without_a_call_is_the_answer_and_ends_the_episode():
    env = Calculator()
    env.reset(None)
    assert env.step("<calc>998*997</calc>").observation == "<result>995006</result>"
    assert env.step("995006") == StepResult(observation=None, reward=None, done=True, info={})


def test_one_call_per_turn_is_read_the_first():
    result = Calculator().step("<calc>1+1</calc> and <calc>2+2</calc>")
    assert result.observation == "<result>2</result> (one call per turn: only the first was read)"
    assert result.info == {"tool_call": "1+1", "error": False}


def test_calls_past_max_calls_are_refused_and_the_episode_goes_on():
    env = Calculator(max_calls=1)
    env.reset(None)
    assert env.step("<calc>1+2</calc>").observation == "<result>3</result>"
    refused = env.step("<calc>3+4</calc>")
    assert refused.observation == "<result>error: no calls left</result>" and not refused.done
    assert refused.info == {"tool_call": "3+4", "error": True}
    assert env.step("7").done
    env.reset(None)  # a new episode counts its calls afresh
    assert env.step("<calc>3+4</calc>").observation == "<result>7</result>"


def test_values_are_written_as_the_parser_reads_them_back():
    from fractions import Fraction

    from contracts.arith_parser import evaluate

    for value in (Fraction(7), Fraction(-12), Fraction(5, 2), Fraction(1, 10**9), Fraction(-2, 3), Fraction(10**40)):
        text = format_number(value)
        assert "e" not in text.lower() and abs(evaluate(text) - value) <= abs(value) * Fraction(1, 10**11)
    assert format_number(Fraction(10**40)) == "1" + "0" * 40


# --- conversation ------------------------------------------------------------------------------

XTUNER = {
    "system": "Be kind.",
    "conversation": [
        {"input": "hi there", "output": "hello friend"},
        {"input": "how are you", "output": "i am fine thanks"},
        {"input": "bye", "output": "goodbye friend"},
    ],
}


def test_a_three_turn_xtuner_record_is_played_turn_by_turn_with_rewards_against_each_reference():
    record = parse_prompt(XTUNER, "xtuner", "x:1")
    assert Conversation.opening(record) == [Message("system", "Be kind."), Message("user", "hi there")]
    env = Conversation()
    assert env.reset(record) is None
    # token F1: {hello, my, friend} against {hello, friend}: P 2/3, R 1 -> 0.8
    first = env.step("hello my friend")
    assert first.observation == "how are you" and not first.done and first.reward == pytest.approx(0.8)
    # {i, am, fine} against {i, am, fine, thanks}: P 1, R 3/4 -> 6/7
    second = env.step("i am fine")
    assert second.observation == "bye" and not second.done and second.reward == pytest.approx(6 / 7)
    # The last turn is the reward workers' to score, against record.reference ("goodbye friend").
    assert env.step("goodbye") == StepResult(observation=None, reward=None, done=True, info={"turn": 2})
    assert record.reference == "goodbye friend"
    with pytest.raises(RuntimeError, match="after the episode was done"):
        env.step("more")


def test_a_chat_record_with_weighted_rules():
    record = parse_prompt(
        {
            "messages": [
                {"role": "system", "content": "Answer with a number."},
                {"role": "user", "content": "What is 2+2?"},
                {"role": "assistant", "content": "4"},
                {"role": "user", "content": "And 3+3?"},
                {"role": "assistant", "content": "6"},
            ]
        },
        "chat",
        "c:1",
    )
    assert Conversation.opening(record) == list(record.messages[:2])
    env = Conversation(rules=["arithmetic", "similarity"], weights=[1.0, 0.5])
    env.reset(record)
    first = env.step("It is 4")  # arithmetic 1 (final number 4); similarity {it, is, 4} vs {4}: P 1/3, R 1 -> 0.5
    assert first.reward == pytest.approx(1.0 + 0.5 * 0.5) and first.observation == "And 3+3?"
    assert env.step("6").done


def test_a_record_with_one_user_turn_is_an_episode_of_one_turn():
    record = parse_prompt({"prompt": "Say hi", "completion": "hi"}, "sft", "s:1")
    env = Conversation()
    env.reset(record)
    assert Conversation.opening(record) == list(record.messages)
    assert env.step("hi") == StepResult(done=True, info={"turn": 0})


def test_the_rules_see_the_turns_reference_and_the_records_metadata(tmp_path, monkeypatch):
    (tmp_path / "turn_rules.py").write_text(
        "def echo(prompt, response, reference):\n    return float(len(reference) + 10 * (prompt == 'q1'))\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    record = parse_prompt(
        {"conversation": [{"input": "q1", "output": "abc"}, {"input": "q2"}], "metadata": {"k": 1}}, "xtuner", "x:1"
    )
    env = Conversation(rules=["turn_rules:echo"])
    env.reset(record)
    assert env.step("whatever").reward == 13.0  # len("abc") + 10: the first turn's question and reference
    sys.modules.pop("turn_rules", None)


@pytest.mark.parametrize(
    "params, message",
    [
        ({"rules": ["nope"]}, "unknown reward rule 'nope'"),
        ({"rules": []}, "rules must be a non-empty list"),
        ({"rules": "similarity"}, "rules must be a non-empty list"),
        ({"rules": ["similarity"], "weights": [1.0, 2.0]}, "weights must be a list of 1 number"),
        ({"weights": ["x"]}, "weights must be finite numbers"),
        ({"temperature": 1}, "unexpected keyword argument 'temperature'"),
    ],
)
def test_bad_conversation_params_are_a_config_error_naming_env_params(params, message):
    with pytest.raises(ConfigError, match="^env.params: conversation: ") as e:
        check_environment(EnvConfig(name="conversation", params=params))
    assert message in str(e.value) and len(str(e.value).splitlines()) == 1
