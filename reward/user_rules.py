"""Rules of your own: a reward rule named `package.module:function` in `reward.rules[].name`.

The function is a plain callable

    function(prompt: str, response: str, reference: str | None, **params) -> float

where `reference` is the data record's reference answer (None when it has none) and `params` are
the rule's `reward.rules[].params`. The module must be importable on every node that runs a reward
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


def component_name(name: str) -> str:
    """The reward component a rule scores into: a built-in's name, or a user rule's function name."""
    return name.rpartition(USER_SEPARATOR)[2]


def user_rule(name: str, function: object, field: str) -> Callable[..., float]:
    """The user's `function` (imported from `name`), called as the built-ins are: (prompt, response,
    record, **params).

    ConfigError naming `field` when it is not callable or its signature cannot take (prompt, response,
    reference) positionally. The returned rule's signature (what `inspect.signature` and so
    `rule_params.check_params` read) is the user function's own.
    """
    attribute = component_name(name)
    if not callable(function):
        raise ConfigError(f"{field}: {name}: {attribute} is a {type(function).__name__}, not a function")
    try:
        inspect.signature(function).bind_partial("", "", None)
    except (TypeError, ValueError) as e:
        raise ConfigError(
            f"{field}: {name}: cannot be called as {attribute}(prompt, response, reference, **params): {e}"
        ) from None
    return _with_reference(function)


def _with_reference(function: Callable[..., Any]) -> Callable[..., Any]:
    """`function(prompt, response, reference, **params)` as a rule taking the whole record, the one
    place where a user's calling convention meets the built-ins'."""

    @functools.wraps(function)  # keeps the user's signature for check_params, and its name in logs
    def rule(prompt: str, response: str, record: Any, **params: Any) -> Any:
        return function(prompt, response, getattr(record, "reference", None), **params)

    return rule
