"""Rule `reasoning_gym`: a response scored by its reasoning-gym task's own scorer.

A task's scorer knows what counts as right, which a comparison with the one stored answer does not: a
countdown expression other than the stored one that reaches the target, any valid n-queens board. The rule
reads the entry `data.prompts: reasoning_gym:TASK` keeps as `metadata["entry"]` (question, answer, and
its metadata naming `source_dataset`), takes the answer from the response (the text inside the last
`<answer>...</answer>`, else the whole response, stripped) and returns
`reasoning_gym.get_score_answer_fn(source_dataset)(answer, entry)`, usually in [0, 1].

Nothing the model writes is run as code, and a few of reasoning-gym's scorers would: they read an answer
written as a Python list with `eval`, or an expression with sympy's `parse_expr` (which calls `eval`). The
name such a scorer calls is rebound, in its task's module, to a reader that takes only what the scorer
means to read: `ast.literal_eval` for the lists (`LITERAL_ONLY`), the project's arithmetic parser's grammar
before sympy sees an expression (`ARITHMETIC_ONLY`). Any other task whose scorer's source names `eval`,
`exec`, `parse_expr` or `sympify` (the integration and polynomial tasks, whose answers are expressions in
x) is refused with ValueError, as is one whose source cannot be read to check.

reasoning-gym is imported when a scorer is built (the rule's parameter check), not when the registry
imports this module, so the other rules work without the extra; without it the check raises ConfigError
saying what to install.
"""

from __future__ import annotations

import ast
import inspect
import re
import sys
from collections.abc import Callable, Mapping
from functools import lru_cache
from typing import Any

from contracts.arith_parser import ArithmeticSyntaxError, evaluate
from contracts.config import ConfigError
from contracts.reasoning_gym_source import ENTRY, import_reasoning_gym
from reward.rules import RULES

ANSWER_TAG = "answer"
MAX_TAG_CHARS = 32

# Tasks whose scorer calls `eval` on the answer (or, for number_sorting, on the entry's answer): their
# module's `eval` reads Python literals only.
LITERAL_ONLY = ("binary_matrix", "n_queens", "number_sorting", "spiral_matrix", "string_insertion")
# Tasks whose scorer calls the `parse_expr` its module imported on the answer: only arithmetic reaches it.
ARITHMETIC_ONLY = ("countdown", "puzzle24")
MAX_LITERAL_CHARS = 20_000
MAX_ARITHMETIC_CHARS = 200
_RUNS_CODE = re.compile(r"(\.)?\b(eval|exec|parse_expr|sympify)\b")  # "literal_eval" is no match
_ARITHMETIC_CHARS = re.compile(r"[0-9.+\-*/()\s]+")


def check_answer_tag(answer_tag: str) -> None:
    """ValueError unless `answer_tag` is a tag name, or "" (the whole response is the answer)."""
    if not isinstance(answer_tag, str) or (
        answer_tag and not (len(answer_tag) <= MAX_TAG_CHARS and re.fullmatch(r"[A-Za-z_][\w-]*", answer_tag))
    ):
        raise ValueError(
            f"reasoning_gym: answer_tag must be a tag name such as 'answer' (or '' for the whole response), "
            f"got {answer_tag!r}"
        )


def _check(answer_tag: str) -> None:
    """The extra installed (ConfigError otherwise) and the tag a name: run once when a scorer is built."""
    import_reasoning_gym("the reasoning_gym rule", ConfigError)
    check_answer_tag(answer_tag)


@RULES.register("reasoning_gym", param_check=_check)
def reasoning_gym(prompt: str, response: str, record: Any, answer_tag: str = ANSWER_TAG) -> float:
    """The task's own score of the answer in `response` for the record's reasoning-gym entry.

    The answer is the text inside the last `<answer_tag>...</answer_tag>` when the response has one, else
    the whole response; either stripped of surrounding whitespace. ValueError when the record holds no
    entry (its prompts did not come from `reasoning_gym:`), or the entry's task has no scorer the rule runs.
    """
    entry = record_entry(record)
    return score_answer(extract_answer(response, answer_tag), entry)


def record_entry(record: Any) -> Mapping[str, Any]:
    """The reasoning-gym entry a record keeps; ValueError when it keeps none."""
    metadata = getattr(record, "metadata", None) or {}
    entry = metadata.get(ENTRY) if isinstance(metadata, Mapping) else None
    if not isinstance(entry, Mapping) or not isinstance(entry.get("metadata"), Mapping):
        raise ValueError(
            f'reasoning_gym: the record has no reasoning-gym entry in metadata["{ENTRY}"]; '
            "score records from data.prompts: reasoning_gym:TASK"
        )
    return entry


def extract_answer(response: str, answer_tag: str = ANSWER_TAG) -> str:
    """The text inside the last `<tag>...</tag>` of `response`, else the whole response; stripped."""
    if answer_tag:
        found = _tag_pattern(answer_tag).findall(response)
        if found:
            return found[-1].strip()
    return response.strip()


def score_answer(answer: str, entry: Mapping[str, Any]) -> float:
    """The entry's task scorer on `answer`, as a float. ValueError when the entry's task has no scorer the
    rule runs."""
    task = entry["metadata"].get("source_dataset")
    return float(task_scorer(task)(answer, entry))


@lru_cache(maxsize=None)
def task_scorer(task: str) -> Callable[[str, Mapping[str, Any]], float]:
    """reasoning-gym's scorer of `task`, its module's code-running names rebound first (see the module's
    doc); built once per process, since building one makes a dataset of the task. ValueError for a task
    reasoning-gym does not know, or one whose scorer could run the answer as code."""
    rg = import_reasoning_gym("the reasoning_gym rule", ConfigError)
    datasets = rg.factory.DATASETS
    if not isinstance(task, str) or task not in datasets:
        raise ValueError(f"reasoning_gym: the entry's source_dataset {task!r} is no reasoning-gym task")
    dataset_cls = datasets[task][0]
    module = sys.modules[dataset_cls.__module__]
    rebound = "eval" if task in LITERAL_ONLY else "parse_expr" if task in ARITHMETIC_ONLY else None
    _refuse_if_it_runs_code(task, dataset_cls, rebound)
    if rebound == "eval":
        module.eval = literal_only
    elif rebound == "parse_expr":
        module.parse_expr = arithmetic_only(module.parse_expr)
    return rg.get_score_answer_fn(task)


def literal_only(source: Any, *args: Any, **kwargs: Any) -> Any:
    """The value `source` spells when it is a Python literal (a list, a string, a number...), read by
    `ast.literal_eval`, which runs nothing; ValueError for anything else, which the scorers that call it
    treat as an unreadable answer."""
    if not isinstance(source, str) or len(source) > MAX_LITERAL_CHARS:
        raise ValueError("not a Python literal of a readable size")
    return ast.literal_eval(source)


def arithmetic_only(parse_expr: Callable[..., Any]) -> Callable[..., Any]:
    """`parse_expr` for text in the arithmetic parser's grammar (numbers, + - * / and parentheses, in ASCII),
    ValueError for any other: names, powers and calls never reach sympy's `eval`."""
    if getattr(parse_expr, "arithmetic_only", False):
        return parse_expr

    def guarded(text: Any, *args: Any, **kwargs: Any) -> Any:
        if not (isinstance(text, str) and len(text) <= MAX_ARITHMETIC_CHARS and _ARITHMETIC_CHARS.fullmatch(text)):
            raise ValueError("not arithmetic")
        try:
            evaluate(text)
        except ZeroDivisionError:
            pass  # arithmetic all the same: sympy reads it as infinity
        except ArithmeticSyntaxError as e:
            raise ValueError(f"not arithmetic: {e}") from None
        return parse_expr(text, *args, **kwargs)

    guarded.arithmetic_only = True
    return guarded


def _refuse_if_it_runs_code(task: str, dataset_cls: type, rebound: str | None) -> None:
    """ValueError when the scorer's source names a way to run code other than `rebound` called by its bare
    name (which the module's rebinding reaches; `sympy.parse_expr` it would not), or cannot be read."""
    try:
        source = inspect.getsource(dataset_cls.score_answer)
    except (OSError, TypeError):
        raise ValueError(
            f"reasoning_gym: cannot read the source of {task}'s scorer to check it does not run the answer as code"
        ) from None
    for found in _RUNS_CODE.finditer(source):
        if found.group(1) or found.group(2) != rebound:
            raise ValueError(
                f"reasoning_gym: {task}'s scorer reads the answer with {found.group(2)}, which can run it as "
                "code; this rule does not score that task: choose another, or score it with another rule"
            )


@lru_cache(maxsize=16)
def _tag_pattern(tag: str) -> re.Pattern[str]:
    # Non-greedy to the first closing tag after each opening one; the tag is escaped, and generation bounds
    # the response's length, so the scan stays short.
    return re.compile(f"<{re.escape(tag)}>(.*?)</{re.escape(tag)}>", re.DOTALL)
