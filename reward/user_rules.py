"""Rules of your own: a reward rule named `package.module:function` in `reward.rules[].name`.

The function is a plain callable

    function(prompt: str, response: str, reference: str | None, **params) -> float

where `reference` is the data record's reference answer (None when it has none) and `params` are
the rule's `reward.rules[].params`. The module must be importable on every node that runs a reward
worker (installed, or shipped with the job's working directory). It is imported once, when a
`RuleScorer` is built, and each call then runs under the scorer's time limit like a built-in rule.
Names are resolved with `importlib` and `getattr`: no configured text is ever evaluated as code.
"""

from __future__ import annotations

import functools
import importlib
import inspect
from collections.abc import Callable
from typing import Any

SEPARATOR = ":"


def is_user_rule(name: str) -> bool:
    """Whether `name` names a function of the user's (`package.module:function`), not a built-in."""
    return SEPARATOR in name


def component_name(name: str) -> str:
    """The reward component a rule scores into: a built-in's name, or a user rule's function name."""
    return name.rpartition(SEPARATOR)[2]


def load_user_rule(name: str) -> Callable[..., float]:
    """The function `name` points at, called as the built-ins are: (prompt, response, record, **params).

    Raises ValueError saying what is wrong: the name is not `package.module:function`, the module
    does not import, it has no such attribute, the attribute is not callable, or its signature cannot
    take (prompt, response, reference) positionally. The returned rule's signature (what
    `inspect.signature` and so `rule_registry.check_params` read) is the user function's own.
    """
    module_name, _, attribute = name.partition(SEPARATOR)
    if not (all(part.isidentifier() for part in module_name.split(".")) and attribute.isidentifier()):
        raise ValueError(f"{name!r} is not package.module:function (Python names, one colon)")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"{name}: cannot import {module_name} ({e}); is it installed on every node?") from None
    except Exception as e:  # noqa: BLE001 - a module that raises while importing is a config problem too
        raise ValueError(f"{name}: importing {module_name} raised {type(e).__name__}: {e}") from None
    function = getattr(module, attribute, None)
    if function is None:
        raise ValueError(f"{name}: module {module_name} has no {attribute!r}")
    if not callable(function):
        raise ValueError(f"{name}: {attribute} is a {type(function).__name__}, not a function")
    try:
        inspect.signature(function).bind_partial("", "", None)
    except (TypeError, ValueError) as e:
        raise ValueError(
            f"{name}: cannot be called as {attribute}(prompt, response, reference, **params): {e}"
        ) from None
    return _with_reference(function)


def _with_reference(function: Callable[..., Any]) -> Callable[..., Any]:
    """`function(prompt, response, reference, **params)` as a rule taking the whole record, the one
    place where a user's calling convention meets the built-ins'."""

    @functools.wraps(function)  # keeps the user's signature for check_params, and its name in logs
    def rule(prompt: str, response: str, record: Any, **params: Any) -> Any:
        return function(prompt, response, getattr(record, "reference", None), **params)

    return rule
