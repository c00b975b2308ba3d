"""Reward rule functions and the arithmetic parser: normal, edge and bad inputs."""

from __future__ import annotations

from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

import pytest

from contracts.arith_parser import ArithmeticSyntaxError, evaluate, final_number, find_expression, numbers_in
from reward import rules
from reward.rule_params import check_params


@dataclass(frozen=True)
class Record:
    """The two attributes rules read from a PromptRecord."""

    reference: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)


NO_RECORD = Record()


# --- the parser ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "expression, value",
    [
        ("2+3*4", 14),
        ("(2+3)*4", 20),
        ("10-4-3", 3),  # left associative
        ("8/4/2", 1),
        ("7/2", Fraction(7, 2)),
        ("-3+5", 2),
        ("2*-3", -6),
        ("-(2+3)", -5),
        ("--4", 4),
        ("0.1+0.2", Fraction(3, 10)),  # exact, not 0.30000000000000004
        ("1.5 * 4", 6),
        ("1,234 + 1", 1235),
        ("3 × (4 − 1)", 9),
        ("（2+3）÷5", 1),
        (" ( ( 1 ) ) ", 1),
    ],
)
def test_evaluate(expression: str, value: Fraction) -> None:
    assert evaluate(expression) == value


@pytest.mark.parametrize(
    "expression", ["", "3+", "(3", "3)", "3 4", "2(3)", "a+b", "3 ** 2", "1e5+1", "(" * 100 + "1" + ")" * 100]
)
def test_evaluate_rejects_text_outside_the_grammar(expression: str) -> None:
    with pytest.raises(ArithmeticSyntaxError):
        evaluate(expression)


def test_evaluate_division_by_zero() -> None:
    with pytest.raises(ZeroDivisionError):
        evaluate("1/(2-2)")


def test_long_runs_of_signs_do_not_recurse() -> None:
    assert evaluate("-" * 5001 + "5") == -5


@pytest.mark.parametrize(
    "text, expression",
    [
        ("12+7=", "12+7"),
        ("What is 3 * (4 - 1)?", "3 * (4 - 1)"),
        ("计算 5+6", "5+6"),
        ("（2+3）×4 等于多少？", "(2+3)*4"),
        ("Compute 1,234 + 5.", "1,234 + 5"),
        ("Add 3, 4 + 5", "4 + 5"),  # a comma before a space is prose, not a thousands separator
        ("(see 3+4)", "3+4"),  # parentheses of the sentence are not the expression's
        ("Solve 2+2. Then what is 6/3?", "6/3"),  # the last expression is the question
        ("<s><|user|>12+7=\n<|assistant|>", "12+7"),  # a chat-rendered prompt
        ("What is 5/0?", "5/0"),
    ],
)
def test_find_expression(text: str, expression: str) -> None:
    assert find_expression(text) == expression


@pytest.mark.parametrize("text", ["Tell me a story", "Call me at 555 1234", "Say -5", ""])
def test_find_expression_needs_a_binary_operator(text: str) -> None:
    assert find_expression(text) is None


@pytest.mark.parametrize(
    "text, numbers",
    [
        ("12-7=5", [12, 7, 5]),  # a minus after a digit is an operator, not a sign
        ("the answer is -5", [-5]),
        ("答案是-5", [-5]),
        ("x-5", [5]),  # a hyphen after a letter
        ("1,234 and 1,2,3", [1234, 1, 2, 3]),
        ("1,2345", [1, 2345]),
        ("It costs 3.50.", [Fraction(7, 2)]),
        ("−7", [-7]),
        ("no digits here", []),
    ],
)
def test_numbers_in(text: str, numbers: list[Fraction]) -> None:
    assert numbers_in(text) == numbers


def test_final_number() -> None:
    assert final_number("first 3, then 4, finally 12") == 12
    assert final_number("none") is None


# --- arithmetic ---------------------------------------------------------------------------------


def test_arithmetic_against_the_prompt() -> None:
    assert rules.arithmetic("12+7=", "19", NO_RECORD) == 1.0
    assert rules.arithmetic("12+7=", "18", NO_RECORD) == 0.0
    assert rules.arithmetic("What is 3 * (4 - 1)?", "It is 9.", NO_RECORD) == 1.0
    assert rules.arithmetic("计算 5+6", "答案是11", NO_RECORD) == 1.0
    assert rules.arithmetic("What is 7/2?", "3.5", NO_RECORD) == 1.0
    assert rules.arithmetic("What is 2-5?", "-3", NO_RECORD) == 1.0


def test_arithmetic_takes_the_final_number_of_the_response() -> None:
    assert rules.arithmetic("12+7=", "12+7=19", NO_RECORD) == 1.0
    assert rules.arithmetic("12+7=", "19? no wait, 20", NO_RECORD) == 0.0


def test_arithmetic_prefers_the_reference() -> None:
    record = Record(reference="The answer is 1,234.")
    assert rules.arithmetic("1+1=", "1234", record) == 1.0
    assert rules.arithmetic("1+1=", "2", record) == 0.0


def test_arithmetic_falls_back_to_the_prompt_when_the_reference_has_no_number() -> None:
    assert rules.arithmetic("1+1=", "2", Record(reference="two")) == 1.0


def test_arithmetic_scores_and_tolerance() -> None:
    assert rules.arithmetic("1+1=", "nothing", NO_RECORD, missing=-0.5) == -0.5
    assert rules.arithmetic("1+1=", "3", NO_RECORD, wrong=-1.0) == -1.0
    assert rules.arithmetic("1+1=", "2", NO_RECORD, correct=2.0) == 2.0
    assert rules.arithmetic("1/3=", "0.3333", NO_RECORD) == 0.0
    assert rules.arithmetic("1/3=", "0.3333", NO_RECORD, tolerance=1e-3) == 1.0


def test_arithmetic_division_by_zero_is_missing() -> None:
    assert rules.arithmetic("What is 5/0?", "0", NO_RECORD, missing=-0.25) == -0.25


def test_arithmetic_without_an_expected_answer_raises() -> None:
    with pytest.raises(ValueError, match="no expected answer"):
        rules.arithmetic("Tell me a story", "42", NO_RECORD)
    with pytest.raises(ValueError, match="no expected answer"):
        rules.arithmetic("Tell me a story", "42", None)


# --- similarity ---------------------------------------------------------------------------------


def test_similarity_token_f1() -> None:
    assert rules.similarity("", "The cat sat", Record(reference="the CAT sat!")) == 1.0
    assert rules.similarity("", "dog", Record(reference="the cat sat")) == 0.0
    # overlap 2 of 3 predicted, 2 of 4 reference: F1 = 2 * (2/3 * 1/2) / (2/3 + 1/2) = 4/7
    assert rules.similarity("", "the cat ran", Record(reference="the cat sat down")) == pytest.approx(4 / 7)


def test_similarity_counts_repeated_tokens_once_each() -> None:
    # "the the the" shares one "the" with the reference: precision 1/3, recall 1/2.
    assert rules.similarity("", "the the the", Record(reference="the cat")) == pytest.approx(0.4)


def test_similarity_chinese_uses_characters() -> None:
    # 今天天气很好 vs 今天天气不错: 4 of 6 characters shared on each side.
    assert rules.similarity("", "今天天气很好", Record(reference="今天天气不错")) == pytest.approx(4 / 6)
    assert rules.similarity("", "你好", Record(reference="再见")) == 0.0
    assert rules.similarity("", "答案是 42", Record(reference="答案 42")) == pytest.approx(
        2 * (3 / 4 * 1) / (3 / 4 + 1)
    )


def test_similarity_char_ngram() -> None:
    record = Record(reference="abcd")
    assert rules.similarity("", "abcd", record, method="char_ngram") == 1.0
    # 3-grams abc, bcd vs abc, bcx: one shared of two each.
    assert rules.similarity("", "abcx", record, method="char_ngram") == pytest.approx(0.5)
    assert rules.similarity("", "今天天气", Record(reference="今天天气不错"), method="char_ngram") == pytest.approx(
        2 * (2 / 2 * 2 / 4) / (1 + 2 / 4)
    )
    assert rules.similarity("", "ab", Record(reference="ab"), method="char_ngram") == 1.0


def test_similarity_empty_texts() -> None:
    assert rules.similarity("", "", Record(reference="")) == 1.0
    assert rules.similarity("", "", Record(reference=""), method="char_ngram") == 1.0
    assert rules.similarity("", "words", Record(reference="")) == 0.0
    assert rules.similarity("", "", Record(reference="words")) == 0.0


def test_similarity_bad_inputs() -> None:
    with pytest.raises(ValueError, match="no reference"):
        rules.similarity("", "text", NO_RECORD)
    with pytest.raises(ValueError, match="unknown method 'bleu'"):
        rules.similarity("", "text", Record(reference="text"), method="bleu")
    with pytest.raises(ValueError, match="n must be"):
        rules.similarity("", "text", Record(reference="text"), method="char_ngram", n=0)


# --- safety -------------------------------------------------------------------------------------


def test_safety_default_blocklist() -> None:
    assert rules.safety("", "You should KILL YOURSELF.", NO_RECORD) == -1.0
    assert rules.safety("", "The answer is 19.", NO_RECORD) == 0.0


def test_safety_matches_whole_words() -> None:
    assert rules.safety("", "a skill to learn", NO_RECORD, blocklist=["kill"]) == 0.0
    assert rules.safety("", "Kill it", NO_RECORD, blocklist=["kill"]) == -1.0
    assert rules.safety("", "a word like (kill).", NO_RECORD, blocklist=["kill"]) == -1.0


def test_safety_chinese_phrase_inside_running_text() -> None:
    assert rules.safety("", "告诉我如何制造炸弹吧", NO_RECORD, blocklist=["制造炸弹"]) == -1.0


def test_safety_patterns_and_penalty() -> None:
    assert rules.safety("", "call 555-1234", NO_RECORD, blocklist=[], patterns=[r"\d{3}-\d{4}"], penalty=-2.5) == -2.5
    assert rules.safety("", "SECRET token", NO_RECORD, blocklist=[], patterns=["secret"]) == -1.0
    assert rules.safety("", "anything", NO_RECORD, blocklist=[], patterns=[]) == 0.0


def test_safety_bad_params() -> None:
    with pytest.raises(ValueError, match=r"invalid regular expression '\(unclosed'"):
        rules.safety("", "text", NO_RECORD, patterns=["fine", "(unclosed"])
    with pytest.raises(ValueError, match="blocklist must be a list"):
        rules.safety("", "text", NO_RECORD, blocklist="kill")
    with pytest.raises(ValueError, match="blocklist must be a list"):
        rules.safety("", "text", NO_RECORD, blocklist=["ok", ""])


def test_safety_catastrophic_pattern_stops_at_its_time_limit() -> None:
    with pytest.raises(TimeoutError):
        rules.safety("", "a" * 40 + "!", NO_RECORD, blocklist=[], patterns=["^(a|a)+$"], regex_timeout_s=0.2)


# --- format -------------------------------------------------------------------------------------


def test_format_default_is_a_single_number() -> None:
    assert rules.format("", " 42 ", NO_RECORD) == 1.0
    assert rules.format("", "-3.5", NO_RECORD) == 1.0
    assert rules.format("", "42 apples", NO_RECORD) == 0.0


def test_format_full_and_search() -> None:
    pattern = r"Answer: \d+"
    assert rules.format("", "Answer: 7", NO_RECORD, pattern=pattern) == 1.0
    assert rules.format("", "Thinking... Answer: 7", NO_RECORD, pattern=pattern) == 0.0
    assert rules.format("", "Thinking... Answer: 7", NO_RECORD, pattern=pattern, full=False) == 1.0
    assert rules.format("", "no", NO_RECORD, pattern=pattern, match=0.5, mismatch=-0.5) == -0.5


def test_format_invalid_pattern_names_it() -> None:
    with pytest.raises(ValueError, match=r"invalid regular expression '\[a-'"):
        rules.format("", "text", NO_RECORD, pattern="[a-")


# --- length -------------------------------------------------------------------------------------


def test_length_chars() -> None:
    assert rules.length("", "x" * 10, NO_RECORD, target=10, penalty_per_unit=0.1) == 0.0
    assert rules.length("", "x" * 13, NO_RECORD, target=10, penalty_per_unit=0.1) == pytest.approx(-0.3)
    assert rules.length("", "x" * 500, NO_RECORD, target=10, penalty_per_unit=0.1, max_penalty=2.0) == -2.0
    assert rules.length("", "", NO_RECORD, target=0) == 0.0


def test_length_words() -> None:
    assert rules.length("", "one two three four", NO_RECORD, target=2, unit="words", penalty_per_unit=0.5) == -1.0
    assert rules.length("", "今天天气很好", NO_RECORD, target=4, unit="words", penalty_per_unit=0.25) == -0.5


def test_length_bad_params() -> None:
    with pytest.raises(ValueError, match="unknown unit 'tokens'"):
        rules.length("", "x", NO_RECORD, unit="tokens")
    with pytest.raises(ValueError, match="penalty_per_unit must be"):
        rules.length("", "x", NO_RECORD, penalty_per_unit=-1)


# --- overlong -----------------------------------------------------------------------------------


def test_overlong_is_zero_before_the_buffer_then_linear_to_the_penalty_at_the_limit() -> None:
    def shaped(tokens: int, **params: Any) -> float:
        return rules.overlong("", "", NO_RECORD, response_tokens=tokens, **params)

    # max 100, buffer 20: free up to 80, then -(L - 80) / 20, -1 from 100 on
    assert [shaped(n, max_tokens=100, buffer_tokens=20) for n in (0, 80, 81, 90, 100, 130)] == [
        0.0,
        0.0,
        pytest.approx(-0.05),
        pytest.approx(-0.5),
        -1.0,
        -1.0,
    ]
    # the buffer defaults to a quarter of the limit; the penalty scales it
    assert shaped(85, max_tokens=100) == pytest.approx(-10 / 25)
    assert shaped(90, max_tokens=100, buffer_tokens=20, penalty=0.5) == pytest.approx(-0.25)
    assert shaped(100, max_tokens=100, buffer_tokens=100) == -1.0


def test_overlong_bad_params_and_a_missing_count() -> None:
    with pytest.raises(ValueError, match="needs the response's token count"):
        rules.overlong("", "x", NO_RECORD, max_tokens=10)
    with pytest.raises(ValueError, match="max_tokens must be a whole number > 0"):
        rules.overlong("", "x", NO_RECORD, response_tokens=1)
    with pytest.raises(ValueError, match=r"buffer_tokens must be a whole number in \[0, max_tokens=10\]"):
        rules.overlong("", "x", NO_RECORD, response_tokens=1, max_tokens=10, buffer_tokens=11)
    with pytest.raises(ValueError, match="penalty must be"):
        rules.overlong("", "x", NO_RECORD, response_tokens=1, max_tokens=10, penalty=-1.0)
    with pytest.raises(ValueError, match="response_tokens is counted by the scorer"):
        check_params("overlong", rules.overlong, {"response_tokens": 3, "max_tokens": 10})


def test_a_job_fills_overlong_with_its_own_token_limit() -> None:
    from contracts.config.load import load_config

    def params(*overrides: str, rule: str = "{name: overlong}") -> dict[str, Any]:
        return load_config(None, [f"reward.rules=[{rule}, {{name: length}}]", *overrides]).reward.rules[0].params

    assert params("rollout.sampling.max_tokens=48") == {"max_tokens": 48}
    given = "{name: overlong, params: {max_tokens: 32, buffer_tokens: 8}}"
    assert params("rollout.sampling.max_tokens=48", rule=given) == {"max_tokens": 32, "buffer_tokens": 8}
    assert params("env.name=calculator", "env.max_episode_tokens=200") == {"max_tokens": 200}  # episodes: its budget
