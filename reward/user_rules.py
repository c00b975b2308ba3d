"""Rules of your own: a reward rule named `package.module:function` in `reward.rules[].name`.

The function is a plain callable

    function(prompt: str, response: str, reference: str | None, **params) -> float

where `reference` is the data record's reference answer (None when it has none) and `params` are
the rule's `reward.rules[].params`. A function that declares a parameter named `metadata` (after the
first three, by keyword) is also given the record's metadata, a dict ({} when the record has none):
the record's "metadata" object plus the columns its layout does not use, which is where a verl
record's `data_source`, `ability`, `extra_info` and `reward_model` are. It is the scorer's to fill,
never a param a config sets. The module must be importable on every node that runs a reward
worker (installed, or shipped with the job's working directory). It is imported once, when a
`RuleScorer` is built (by `contracts.registry.import_entry`, through `reward.rules.RULES`), and each
call then runs under the scorer's time limit like a built-in rule.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

from contracts.config import ConfigError
from contracts.registry import USER_SEPARATOR

METADATA = "metadata"  # the parameter through which a user rule asks for the record's metadata


def component_name(name: str) -> str:
    """The reward component a rule scores into: a built-in's name, or a user rule's function name."""
    return name.rpartition(USER_SEPARATOR)[2]


def user_rule(name: str, function: object, field: str) -> Callable[..., float]:
    """The user's `function` (imported from `name`), called as the built-ins are: (prompt, response,
    record, **params).

    ConfigError naming `field` when it is not callable, its signature cannot take (prompt, response,
    reference) positionally, or it declares `metadata` where it cannot be passed by keyword after
    those three. The returned rule's signature (what `inspect.signature` and so
    `rule_params.check_params` read) is the user function's own.
    """
    attribute = component_name(name)
    if not callable(function):
        raise ConfigError(f"{field}: {name}: {attribute} is a {type(function).__name__}, not a function")
    try:
        signature = inspect.signature(function)
        signature.bind_partial("", "", None)
    except (TypeError, ValueError) as e:
        raise ConfigError(
            f"{field}: {name}: cannot be called as {attribute}(prompt, response, reference, **params): {e}"
        ) from None
    problem = _metadata_problem(signature)
    if problem:
        raise ConfigError(f"{field}: {name}: {problem}")
    return _with_reference(function, takes_metadata=takes_metadata(signature))


def takes_metadata(signature: inspect.Signature) -> bool:
    """Whether a rule declares `metadata` by name (positional-or-keyword or keyword-only), and so is given
    the record's metadata; `**kwargs` alone does not ask for it."""
    parameter = signature.parameters.get(METADATA)
    return parameter is not None and parameter.kind in (
        inspect.Parameter.POSITIONAL_OR_KEYWORD,
        inspect.Parameter.KEYWORD_ONLY,
    )


def _metadata_problem(signature: inspect.Signature) -> str | None:
    """Why the function's `metadata` parameter cannot be given the record's metadata; None when it can
    (or it has none). It is passed by keyword, so it must be one, and not one of the three that
    (prompt, response, reference) fill by position."""
    parameter = signature.parameters.get(METADATA)
    if parameter is None or parameter.kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD):
        return None
    if parameter.kind is inspect.Parameter.POSITIONAL_ONLY:
        return f"its {METADATA} parameter is positional-only; the record's metadata is passed by keyword"
    if METADATA in signature.bind_partial("", "", None).arguments:
        return (
            f"its {METADATA} parameter takes one of (prompt, response, reference); "
            f"declare it after them: (prompt, response, reference, {METADATA})"
        )
    return None


def _with_reference(function: Callable[..., Any], *, takes_metadata: bool) -> Callable[..., Any]:
    """`function(prompt, response, reference, [metadata,] **params)` as a rule taking the whole record,
    the one place where a user's calling convention meets the built-ins'."""

    @functools.wraps(function)  # keeps the user's signature for check_params, and its name in logs
    def rule(prompt: str, response: str, record: Any, **params: Any) -> Any:
        if takes_metadata:
            # A copy: the record's dict is shared by every sample of its prompt, and a rule that pops
            # a key must not take it from the next one.
            params[METADATA] = dict(getattr(record, "metadata", None) or {})
        return function(prompt, response, getattr(record, "reference", None), **params)

    return rule
