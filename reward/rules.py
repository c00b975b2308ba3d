"""Reward rule functions: plain callables with one signature, and their registry.

Every rule is

    rule(prompt: str, response: str, record, **params) -> float

`prompt` is the rendered prompt text, `response` the decoded completion, and `record` the data
record the prompt came from (a `contracts.formats.PromptRecord`); rules read only its `reference`
and `metadata` attributes, so any object with those (or None, where a rule needs neither) will do.
`params` are the rule's keyword arguments from the config's `reward.rules[].params`; a bad value
raises ValueError, and `check_params` runs the same checks once, before any sample is scored.
A rule that declares a keyword `response_tokens` is also given the response's length in tokens by
the scorer (`overlong` does).
`RULES` is the one registry of them: each built-in adds itself with `@RULES.register(name,
param_check=...)`, where `param_check` is the value check the rule also runs on each call, run once
with the config's params by `reward.rule_params.check_params`; `RULES.lookup` also loads a user's
`package.module:function` (`reward.user_rules`), adapted to this signature.

User-supplied regular expressions (safety, format) run on the `regex` package with
`concurrent=True` and a time limit: the stdlib `re` holds the GIL for the whole match, so a
catastrophic pattern would freeze the scorer's timeout along with everything else.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Sequence
from fractions import Fraction
from functools import lru_cache
from typing import Any

import regex

from contracts.arith_parser import evaluate, final_number, find_expression
from contracts.registry import Registry
from reward.user_rules import user_rule

Rule = Callable[..., float]

RULES: Registry[Rule] = Registry(
    "reward rule",
    "reward.rules[].name",
    modules=("reward.reasoning_gym_rule", "reward.math_rule"),
    user_form="package.module:function",
    adapt_user=user_rule,
)


REGEX_TIMEOUT_S = 2.0

# An example only, to show the shape: replace it with the deployment's own list.
DEFAULT_BLOCKLIST = (
    "kill yourself",
    "how to make a bomb",
    "build a pipe bomb",
    "synthesize nerve agent",
)

# Han, kana and CJK compatibility ideographs: scripts written without spaces, tokenised per character.
_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
_WORD = regex.compile(rf"[{_CJK}]|(?:(?![{_CJK}])[^\W_])+")
_SPACE = regex.compile(r"\s+")


# --- arithmetic --------------------------------------------------------------------------------


def _check_arithmetic(tolerance: float) -> None:
    if not tolerance >= 0:
        raise ValueError(f"arithmetic: tolerance must be >= 0, got {tolerance!r}")


@RULES.register("arithmetic", param_check=_check_arithmetic)
def arithmetic(
    prompt: str,
    response: str,
    record: Any,
    tolerance: float = 1e-6,
    correct: float = 1.0,
    wrong: float = 0.0,
    missing: float = 0.0,
) -> float:
    """`correct` when the response's final number is within `tolerance` of the expected answer.

    The expected answer is the final number of `record.reference` when it has one, else the value
    of the last arithmetic expression in the prompt ("12+7=", "What is 3 * (4 - 1)?"). Returns
    `missing` when the response has no number or the prompt's expression divides by zero, `wrong`
    otherwise. Raises ValueError when neither the reference nor the prompt gives an answer.
    """
    _check_arithmetic(tolerance)
    try:
        expected = _expected_answer(prompt, record)
    except ZeroDivisionError:
        return missing
    got = final_number(response)
    if got is None:
        return missing
    return correct if abs(got - expected) <= Fraction(tolerance) else wrong


def _expected_answer(prompt: str, record: Any) -> Fraction:
    reference = getattr(record, "reference", None)
    if reference:
        answer = final_number(reference)
        if answer is not None:
            return answer
    expression = find_expression(prompt)
    if expression is None:
        raise ValueError(
            "arithmetic: no expected answer: the record's reference has no number and "
            f"the prompt has no arithmetic expression (prompt: {prompt[-80:]!r})"
        )
    return evaluate(expression)


# --- similarity --------------------------------------------------------------------------------

SIMILARITY_METHODS = ("token_f1", "char_ngram")


def _check_similarity(method: str, n: int) -> None:
    if method not in SIMILARITY_METHODS:
        raise ValueError(f"similarity: unknown method {method!r}; known: {', '.join(SIMILARITY_METHODS)}")
    if not (isinstance(n, int) and n >= 1):
        raise ValueError(f"similarity: n must be a whole number >= 1, got {n!r}")


@RULES.register("similarity", param_check=_check_similarity)
def similarity(prompt: str, response: str, record: Any, method: str = "token_f1", n: int = 3) -> float:
    """Overlap of the response with `record.reference`, in [0, 1].

    `token_f1`: F1 over lowercase word tokens (counted with multiplicity); CJK characters are one
    token each, since those scripts put no spaces between words. `char_ngram`: F1 over character
    `n`-grams of the lowercased, whitespace-collapsed texts (a text shorter than `n` is one gram).
    Two texts with no tokens are identical (1.0). Raises ValueError without a reference.
    """
    _check_similarity(method, n)
    reference = getattr(record, "reference", None)
    if reference is None:
        raise ValueError("similarity: the record has no reference to compare with")
    if method == "token_f1":
        return _f1(Counter(word_tokens(response)), Counter(word_tokens(reference)))
    return _f1(_char_ngrams(response, n), _char_ngrams(reference, n))


def word_tokens(text: str) -> list[str]:
    """Lowercase words, with each CJK character a word of its own; punctuation is dropped."""
    return _WORD.findall(text.lower())


def _char_ngrams(text: str, n: int) -> Counter[str]:
    text = _SPACE.sub(" ", text.lower()).strip()
    if len(text) <= n:
        return Counter([text] if text else [])
    return Counter(text[i : i + n] for i in range(len(text) - n + 1))


def _f1(predicted: Counter[str], reference: Counter[str]) -> float:
    if not predicted and not reference:
        return 1.0
    overlap = sum((predicted & reference).values())
    if overlap == 0:
        return 0.0
    precision = overlap / sum(predicted.values())
    recall = overlap / sum(reference.values())
    return 2 * precision * recall / (precision + recall)


# --- safety ------------------------------------------------------------------------------------


def _check_safety(blocklist: Sequence[str], patterns: Sequence[str]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The lists as tuples (hashable, for the compiled-matcher cache), after checking their shape."""
    for label, items in (("blocklist", blocklist), ("patterns", patterns)):
        if isinstance(items, str) or not all(isinstance(item, str) and item for item in items):
            raise ValueError(f"safety: {label} must be a list of non-empty strings, got {items!r}")
    for pattern in patterns:
        _compile(pattern, "safety")
    return tuple(blocklist), tuple(patterns)


@RULES.register("safety", param_check=_check_safety)
def safety(
    prompt: str,
    response: str,
    record: Any,
    blocklist: Sequence[str] = DEFAULT_BLOCKLIST,
    patterns: Sequence[str] = (),
    penalty: float = -1.0,
    regex_timeout_s: float = REGEX_TIMEOUT_S,
) -> float:
    """`penalty` when the response contains a blocklisted phrase or matches a pattern, else 0.0.

    Both are case-insensitive. A phrase matches as whole words where it begins or ends with a
    letter or digit ("kill" does not match "skill"); CJK phrases match anywhere. `patterns` are
    regular expressions searched in the response; one running longer than `regex_timeout_s`
    raises TimeoutError.
    """
    matcher = _safety_matcher(*_check_safety(blocklist, patterns))
    if matcher is None:
        return 0.0
    found = matcher.search(response, concurrent=True, timeout=regex_timeout_s)
    return penalty if found else 0.0


@lru_cache(maxsize=64)
def _safety_matcher(blocklist: tuple[str, ...], patterns: tuple[str, ...]) -> regex.Pattern | None:
    """One alternation of every phrase and pattern, so a response is scanned once."""
    parts = [_phrase_pattern(phrase) for phrase in blocklist] + [f"(?:{p})" for p in patterns]
    return regex.compile("|".join(parts), regex.IGNORECASE) if parts else None


def _phrase_pattern(phrase: str) -> str:
    # \b is not used: it needs a word character on one side, which a CJK phrase between CJK
    # characters has on both, so it would never match inside running Chinese text.
    start = r"(?<![^\W_])" if phrase[0].isascii() and phrase[0].isalnum() else ""
    end = r"(?![^\W_])" if phrase[-1].isascii() and phrase[-1].isalnum() else ""
    return start + regex.escape(phrase) + end


# --- format ------------------------------------------------------------------------------------


def _check_format(pattern: str) -> None:
    _compile(pattern, "format")


@RULES.register("format", param_check=_check_format)
def format(
    prompt: str,
    response: str,
    record: Any,
    pattern: str = r"\s*-?\d+(?:\.\d+)?\s*",
    match: float = 1.0,
    mismatch: float = 0.0,
    full: bool = True,
    regex_timeout_s: float = REGEX_TIMEOUT_S,
) -> float:
    """`match` when the response fits `pattern`, else `mismatch`.

    `full=True` needs the whole response to match (fullmatch); `full=False` searches for the
    pattern anywhere. The default accepts a response that is a single number. A match running
    longer than `regex_timeout_s` raises TimeoutError.
    """
    compiled = _compile(pattern, "format")
    run = compiled.fullmatch if full else compiled.search
    return match if run(response, concurrent=True, timeout=regex_timeout_s) else mismatch


def _compile(pattern: str, rule: str) -> regex.Pattern:
    """The compiled pattern; ValueError naming it (and the rule) when it is not a valid regex."""
    if not isinstance(pattern, str):
        raise ValueError(f"{rule}: a pattern must be a string, got {pattern!r}")
    try:
        return _compile_cached(pattern)
    except regex.error as e:
        raise ValueError(f"{rule}: invalid regular expression {pattern!r}: {e}") from None


@lru_cache(maxsize=256)
def _compile_cached(pattern: str) -> regex.Pattern:
    return regex.compile(pattern)


# --- length ------------------------------------------------------------------------------------

LENGTH_UNITS = ("chars", "words")


def _check_length(target: int, unit: str, penalty_per_unit: float, max_penalty: float) -> None:
    if unit not in LENGTH_UNITS:
        raise ValueError(f"length: unknown unit {unit!r}; known: {', '.join(LENGTH_UNITS)}")
    for name, value in (("target", target), ("penalty_per_unit", penalty_per_unit), ("max_penalty", max_penalty)):
        if not (math.isfinite(value) and value >= 0):
            raise ValueError(f"length: {name} must be a finite number >= 0, got {value!r}")


@RULES.register("length", param_check=_check_length)
def length(
    prompt: str,
    response: str,
    record: Any,
    target: int = 200,
    unit: str = "chars",
    penalty_per_unit: float = 0.01,
    max_penalty: float = 1.0,
) -> float:
    """A penalty for responses longer than `target`, never positive.

    Returns -min(max_penalty, penalty_per_unit * max(0, len(response) - target)), with the length
    in characters or in words (as `word_tokens` counts them: CJK characters are a word each).
    Responses at or under `target` get 0.0.
    """
    _check_length(target, unit, penalty_per_unit, max_penalty)
    size = len(response) if unit == "chars" else len(word_tokens(response))
    return 0.0 - min(max_penalty, penalty_per_unit * max(0, size - target))


# --- overlong ----------------------------------------------------------------------------------

# Supplied by the scorer, never by params: a rule that declares it gets the response's token count.
RESPONSE_TOKENS = "response_tokens"


def _check_overlong(max_tokens: int, buffer_tokens: int, penalty: float) -> int:
    """The buffer in tokens; ValueError naming the bad parameter."""
    if not (isinstance(max_tokens, int) and max_tokens > 0):
        raise ValueError(f"overlong: max_tokens must be a whole number > 0, got {max_tokens!r}")
    if not (isinstance(buffer_tokens, int) and 0 <= buffer_tokens <= max_tokens):
        raise ValueError(
            f"overlong: buffer_tokens must be a whole number in [0, max_tokens={max_tokens}], got {buffer_tokens!r}"
        )
    if not (math.isfinite(penalty) and penalty >= 0):
        raise ValueError(f"overlong: penalty must be a finite number >= 0, got {penalty!r}")
    return buffer_tokens or max(1, max_tokens // 4)


@RULES.register("overlong", param_check=_check_overlong)
def overlong(
    prompt: str,
    response: str,
    record: Any,
    *,
    response_tokens: int | None = None,
    max_tokens: int = 0,
    buffer_tokens: int = 0,
    penalty: float = 1.0,
) -> float:
    """A penalty that grows as the response nears the token limit, never positive (DAPO's
    "overlong reward shaping": a truncated answer is penalised for its length, not its content).

    With L = response_tokens, M = max_tokens and B = buffer_tokens (M // 4 when 0):
    0 for L <= M - B, then -penalty * (L - (M - B)) / B, reaching -penalty at L = M. A job fills
    `max_tokens` with its own limit (rollout.sampling.max_tokens, or env.max_episode_tokens for
    episodes), so a config names only the buffer and the penalty, if anything.
    """
    if response_tokens is None:
        raise ValueError("overlong: needs the response's token count (score through the RewardWorker)")
    buffer = _check_overlong(max_tokens, buffer_tokens, penalty)
    over = max(0, response_tokens - (max_tokens - buffer))
    return 0.0 - penalty * min(1.0, over / buffer)
