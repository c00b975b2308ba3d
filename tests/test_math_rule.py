"""The `math` reward rule: final answers read from responses and references, compared by math-verify,
within bounds of size, nesting and time."""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import pytest

from reward.rule_params import check_params
from reward.rules import RULES

# Through the registry, which imports its built-in modules in their order: importing reward.math_rule
# here first would register `math` ahead of the built-ins listed before it.
math_answer = RULES["math"]
math_rule = sys.modules[math_answer.__module__]
final_answer, reference_answer = math_rule.final_answer, math_rule.reference_answer


@dataclass(frozen=True)
class Record:
    """The two attributes rules read from a PromptRecord."""

    reference: Any = None
    metadata: dict[str, Any] = field(default_factory=dict)


GSM8K_SOLUTION = (
    "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
    "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n"
    "#### 72"
)
MATH_SOLUTION = "The height is $\\sqrt{3}/2$ of the side, so the answer is $\\boxed{\\frac{\\sqrt{3}}{2}}$."
NESTED = "\\boxed{" + "{" * 10_000 + "5" + "}" * 10_000 + "}"

# (response, reference, params, score)
CASES = {
    # equivalent forms
    "fraction-vs-decimal": ("So $\\boxed{\\frac{1}{2}}$.", "0.5", {}, 1.0),
    "decimal-vs-fraction": ("\\boxed{0.5}", "\\frac{1}{2}", {}, 1.0),
    "dfrac-vs-decimal": ("\\boxed{\\dfrac{3}{4}}", "0.75", {}, 1.0),
    "slash-fraction": ("\\boxed{3/4}", "\\frac{3}{4}", {}, 1.0),
    "percent-vs-decimal": ("\\boxed{50\\%}", "0.5", {}, 1.0),
    "radical-simplified": ("\\boxed{\\sqrt{8}}", "2\\sqrt{2}", {}, 1.0),
    "radical-unsimplified": ("\\boxed{2\\sqrt{2}}", "\\sqrt{8}", {}, 1.0),
    "set-any-order": ("\\boxed{\\{3, 1, 2\\}}", "\\{1,2,3\\}", {}, 1.0),
    "interval-half-open": ("\\boxed{(1, 2]}", "(1,2]", {}, 1.0),
    "interval-left-right": ("\\boxed{\\left[1, 2\\right)}", "[1,2)", {}, 1.0),
    "expression-commuted": ("\\boxed{1+x}", "x+1", {}, 1.0),
    "expression-expanded": ("\\boxed{x^2+2x+1}", "(x+1)^2", {}, 1.0),
    "equation-vs-value": ("\\boxed{x = 5}", "5", {}, 1.0),
    "pi": ("\\boxed{\\pi}", "\\pi", {}, 1.0),
    "negative": ("\\boxed{-3}", "-3", {}, 1.0),
    "dollars-escaped": ("\\boxed{\\$12}", "12", {}, 1.0),
    "units-in-text": ("\\boxed{12 \\text{ dollars}}", "12", {}, 1.0),
    "thousands-separator": ("\\boxed{1,000}", "1000", {}, 1.0),
    "fbox": ("\\fbox{7}", "7", {}, 1.0),
    "nested-boxed": ("\\boxed{\\boxed{5}}", "5", {}, 1.0),
    "reference-in-dollars": ("\\boxed{x+1}", "$x+1$", {}, 1.0),
    "reference-a-number": ("#### 72", 72, {}, 1.0),
    # GSM8K and MATH references: whole solutions, read by their own final answer
    "gsm8k-hash": ("She sold 72 clips.\n#### 72", GSM8K_SOLUTION, {}, 1.0),
    "gsm8k-boxed": ("\\boxed{72}", GSM8K_SOLUTION, {}, 1.0),
    "gsm8k-answer-is": ("The answer is 72.", GSM8K_SOLUTION, {}, 1.0),
    "gsm8k-dollar-amount": ("#### $1,000", "#### 1000", {}, 1.0),
    "math-solution": ("\\boxed{\\frac{\\sqrt3}{2}}", MATH_SOLUTION, {}, 1.0),
    # "the answer is X" in prose
    "answer-is-full-stop": ("The answer is 12.", "12", {}, 1.0),
    "answer-is-latex": ("so the final answer is $\\frac{1}{2}$. Done.", "1/2", {}, 1.0),
    "answer-is-colon-bold": ("The answer is: **42**", "42", {}, 1.0),
    "answer-is-after-unicode": ("İstanbul, İzmir: THE ANSWER IS 7.", "7", {}, 1.0),
    "answer-is-parens": ("The answer is \\(2.5\\).", "5/2", {}, 1.0),
    # wrong answers: 0, or format_score when math-verify parsed them
    "wrong-number": ("\\boxed{3}", "5", {}, 0.0),
    "wrong-format-score": ("\\boxed{3}", "5", {"format_score": 0.1}, 0.1),
    "wrong-rounded": ("\\boxed{0.333}", "\\frac{1}{3}", {}, 0.0),
    "wrong-interval-ends": ("\\boxed{(1,2)}", "(1,2]", {}, 0.0),
    "wrong-expression": ("\\boxed{x-1}", "x+1", {}, 0.0),
    "wrong-set": ("\\boxed{\\{1,2\\}}", "\\{1,2,3\\}", {}, 0.0),
    "wrong-gsm8k": ("#### 71", GSM8K_SOLUTION, {"format_score": 0.1}, 0.1),
    # several answers: the last boxed counts, and a boxed answer outranks the other forms
    "last-boxed-right": ("First \\boxed{3}, then \\boxed{5}.", "5", {}, 1.0),
    "last-boxed-wrong": ("First \\boxed{5}, then \\boxed{3}.", "5", {}, 0.0),
    "boxed-before-answer-is": ("\\boxed{5}. I hope the answer is 3.", "5", {}, 1.0),
    "hash-before-answer-is": ("The answer is 3.\n#### 5", "5", {}, 1.0),
    "forms-hash-only": ("\\boxed{5}", "5", {"answer_forms": ["hash"]}, 0.0),
    "forms-boxed-only": ("The answer is 5.", "5", {"answer_forms": ["boxed"]}, 0.0),
    "forms-any-order": ("The answer is 5.", "5", {"answer_forms": ["answer_is", "boxed"]}, 1.0),
    # no answer: 0 even with format_score, unless the last-number fallback is on
    "unclosed-boxed": ("\\boxed{5", "5", {"format_score": 0.1}, 0.0),
    "unclosed-last-boxed": ("\\boxed{3} wait, \\boxed{5", "5", {"format_score": 0.1}, 0.0),
    "unclosed-boxed-fallback": ("\\boxed{5", "5", {"last_number_fallback": True}, 1.0),
    "no-marker": ("It is 5", "5", {}, 0.0),
    "no-marker-fallback": ("It is 5", "5", {"last_number_fallback": True}, 1.0),
    "fallback-separators": ("In all, 1,000 apples", "1000", {"last_number_fallback": True}, 1.0),
    "fallback-no-number": ("I do not know", "5", {"last_number_fallback": True, "format_score": 0.1}, 0.0),
    "empty-boxed": ("\\boxed{}", "5", {"format_score": 0.1}, 0.0),
    "empty-response": ("", "5", {}, 0.0),
    "unbalanced-answer-is": ("The answer is \\frac{1}{2.", "1/2", {"format_score": 0.1}, 0.0),
    # adversarial: bounded before math-verify sees them
    "nested-braces": (NESTED, "5", {"format_score": 0.1}, 0.0),
    "open-braces": ("{" * 10_000, "5", {"last_number_fallback": True}, 0.0),
    "deep-fractions": ("\\boxed{" + "\\frac{1}{" * 100 + "2" + "}" * 101, "1", {}, 0.0),
    "one-megabyte": ("x" * 1_000_000 + "\\boxed{5}", "5", {}, 0.0),
    "one-megabyte-of-numbers": ("5 " * 500_000, "5", {"last_number_fallback": True}, 0.0),
    "huge-number": ("The answer is " + "9" * 5_000, "5", {"format_score": 0.1}, 0.0),
}


@pytest.mark.parametrize("response, reference, params, score", list(CASES.values()), ids=list(CASES))
def test_math_rule_table(response: str, reference: Any, params: dict[str, Any], score: float) -> None:
    check_params("math", math_answer, params)
    assert math_answer("", response, Record(reference), **params) == score


@pytest.mark.parametrize(
    "answer",
    [
        "9^{9^{9^{9}}}",  # Python's big integers, which hold the GIL
        "(2^{10000000})!",
        "10^{10^{10}}",  # more memory than the verifier may take
    ],
)
def test_an_answer_that_makes_sympy_run_away_scores_zero_within_the_time_limit(answer: str) -> None:
    started = time.monotonic()
    score = math_answer("", f"\\boxed{{{answer}}}", Record("5"), timeout_s=1.0, format_score=0.1)
    elapsed = time.monotonic() - started
    assert score == 0.0 and not math.isnan(score)
    assert elapsed < 1.0 + 2.0, f"took {elapsed:.1f}s"
    # The verifier that ran away was killed and replaced: the next answer is checked as usual.
    assert math_answer("", "\\boxed{5}", Record("5")) == 1.0


def test_the_time_limit_works_off_the_main_thread() -> None:
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=2) as pool:
        slow = pool.submit(math_answer, "", "\\boxed{9^{9^{9^{9}}}}", Record("5"), timeout_s=1.0)
        quick = pool.submit(math_answer, "", "\\boxed{0.5}", Record("1/2"))
        assert quick.result(timeout=30) == 1.0
        assert slow.result(timeout=30) == 0.0


@pytest.mark.parametrize(
    "text, forms, fallback, answer",
    [
        ("so \\boxed{\\frac{1}{\\{2\\}}} and", ("boxed",), False, "\\frac{1}{\\{2\\}}"),
        ("a \\\\ b \\boxed{x\\\\y}", ("boxed",), False, "x\\\\y"),
        ("\\boxed{ $7$ }.", ("boxed",), False, "7"),
        ("work\n#### 1,234\n", ("hash",), False, "1,234"),
        ("The Answer Is -2.5 apples. Then more.", ("answer_is",), False, "-2.5 apples"),
        ("no marker, 3 and 4.5", ("boxed",), True, "4.5"),
        ("\\boxed{5", ("boxed", "hash"), False, None),
    ],
)
def test_final_answer_reads_each_form(text: str, forms: tuple[str, ...], fallback: bool, answer: str | None) -> None:
    assert final_answer(text, forms, last_number_fallback=fallback) == answer


@pytest.mark.parametrize(
    "reference, message",
    [
        (None, "the record has no reference answer"),
        ("  ", "the record has no reference answer"),
        ("so it is \\boxed{5", "cannot read the final answer of the reference"),
        ("\\frac{1}{2", "is not an answer of at most 1000 characters with balanced braces"),
    ],
)
def test_a_reference_without_an_answer_is_an_error(reference: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        reference_answer(reference)
    with pytest.raises(ValueError, match=message):
        math_answer("", "\\boxed{5}", Record(reference))


@pytest.mark.parametrize(
    "params, message",
    [
        ({"answer_forms": "boxed"}, "parameter 'answer_forms' must be a list"),
        ({"answer_forms": ["boxed", "latex"]}, "math: answer_forms must be a non-empty list of boxed, hash, answer_is"),
        ({"answer_forms": []}, "math: answer_forms must be a non-empty list"),
        ({"last_number_fallback": "yes"}, "parameter 'last_number_fallback' must be true or false"),
        ({"format_score": "0.1"}, "parameter 'format_score' must be a number"),
        ({"format_score": float("nan")}, "math: format_score must be a finite number"),
        ({"timeout_s": 0}, r"math: timeout_s must be a finite number of seconds > 0, got 0"),
        ({"max_response_chars": 0.5}, "math: max_response_chars must be a whole number >= 1"),
        ({"tolerance": 0.1}, "reward rule 'math' has no parameter 'tolerance'"),
    ],
)
def test_bad_params_are_refused_before_any_sample(params: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        check_params("math", RULES["math"], params)


def test_a_bad_param_in_the_config_names_its_field() -> None:
    from contracts.config import ConfigError, RewardConfig, RuleSpec
    from reward.checks import check_reward_config

    check_reward_config(RewardConfig(rules=[RuleSpec(name="math", params={"answer_forms": ["hash"]})]))
    with pytest.raises(ConfigError, match=r"^reward.rules.1.params: math: timeout_s must be"):
        check_reward_config(
            RewardConfig(rules=[RuleSpec(name="length"), RuleSpec(name="math", params={"timeout_s": -1})])
        )


def test_the_rule_scores_through_the_reward_worker_from_a_yaml_config(tmp_path) -> None:
    import pyarrow as pa

    from contracts.config.load import load_config
    from contracts.formats import Message, PromptRecord
    from reward.checks import check_reward_config
    from reward.worker import RewardWorker

    path = tmp_path / "job.yaml"
    path.write_text("reward:\n  rules:\n    - {name: math, params: {format_score: 0.1}}\n")
    cfg = load_config(path).reward
    check_reward_config(cfg)
    math_rule._VERIFIERS.close()
    worker = RewardWorker(cfg)
    # Building the scorer started a verifier and waited until it was ready: no sample pays for the imports.
    assert any(verifier.ready for verifier in math_rule._VERIFIERS._idle)
    records = [
        PromptRecord("gsm", [Message("user", "How many clips?")], GSM8K_SOLUTION, {}, "t:1"),
        PromptRecord("half", [Message("user", "Half of one?")], "\\frac{1}{2}", {}, "t:2"),
        PromptRecord("none", [Message("user", "Anything?")], None, {}, "t:3"),
    ]
    batch = pa.record_batch(
        {
            "prompt_id": ["gsm", "gsm", "half", "half", "none"],
            "prompt": ["p"] * 5,
            "response": ["#### 72", "The answer is 70.", "\\boxed{0.5}", "\\boxed{5", "\\boxed{1}"],
            "response_ids": [[1]] * 5,
        }
    )
    rewards, _ = worker.score_batch(batch, records)
    scores = rewards.column("reward").to_pylist()
    assert scores == pytest.approx([1.0, 0.1, 1.0, 0.0, 0.0])  # no reference: failed, failed_value 0
    worker.close()


def test_the_scorer_counts_a_record_without_a_reference_as_failed() -> None:
    from contracts.config import RuleSpec
    from reward.scorer import RuleScorer

    scorer = RuleScorer([RuleSpec(name="math")], timeout_s=5.0)
    ok, failed = scorer.score_batch([("", "\\boxed{2}", Record("2")), ("", "\\boxed{2}", Record(None))])
    assert ok.components == {"math": 1.0} and ok.failed == []
    assert failed.failed == ["math"] and math.isnan(failed.components["math"])
    scorer.close()


def test_the_example_in_the_docs_scores_as_shown() -> None:
    import json
    import re
    from pathlib import Path

    page = (Path(__file__).resolve().parents[1] / "docs" / "rewards.md").read_text()
    section = page.split("## The math rule", 1)[1].split("\n## ", 1)[0]
    records = [json.loads(line) for line in re.search(r"```json\n(.*?)```", section, re.DOTALL)[1].splitlines()]
    shown = re.findall(r'\{"reward": .*?"math": ([0-9.]+)\}\}', section)
    assert len(records) == len(shown) == 5
    for record, score in zip(records, shown):
        got = math_answer(record["prompt"], record["response"], Record(record["reference"]), format_score=0.1)
        assert got == float(score), record
