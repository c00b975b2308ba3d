"""A reward rule's params checked against the rule before any sample is scored.

`check_params` checks the config's params against the rule's signature and, for a built-in, runs its
value check (the `param_check` it was registered with in `reward.rules.RULES`) once.
"""

from __future__ import annotations

import inspect
from typing import Any

from reward.rules import RESPONSE_TOKENS, RULES, Rule
from reward.user_rules import METADATA

# Arguments the scorer fills for a rule that declares them; a config can never set them.
FILLED_BY_SCORER = {
    RESPONSE_TOKENS: "is counted by the scorer",
    METADATA: "is the record's metadata, given by the scorer",
}


def check_params(name: str, rule: Rule, params: dict[str, Any]) -> None:
    """ValueError naming the rule and the parameter when `rule` does not accept `params`.

    Names are checked against the rule's signature (any name goes where it takes **params, but never
    one the scorer fills: `response_tokens`, `metadata`), a parameter without a default must be
    given, and each value is checked against the kind of its default (a number where the default is
    a number, ...); for the built-in rules the values are
    checked further (regexes compile, methods and units are known), so a bad config fails at
    start-up rather than on every sample.
    """
    signature = inspect.signature(rule)
    named = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    after_three = list(signature.parameters.values())[3:]  # after prompt, response, record
    accepted = {p.name: p for p in after_three if p.kind in named and p.name not in FILLED_BY_SCORER}
    for key, why in FILLED_BY_SCORER.items():
        if key in params:
            raise ValueError(f"reward rule {name!r}: {key} {why}, not set in params")
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in signature.parameters.values())
    for key, value in params.items():
        if key not in accepted:
            if takes_any:
                continue
            raise ValueError(
                f"reward rule {name!r} has no parameter {key!r}; its parameters: {', '.join(accepted) or '(none)'}"
            )
        problem = _kind_problem(accepted[key].default, value)
        if problem:
            raise ValueError(f"reward rule {name!r}: parameter {key!r} {problem}")
    missing = [key for key, p in accepted.items() if p.default is p.empty and key not in params]
    if missing:  # a user rule's parameter without a default would fail every call
        raise ValueError(f"reward rule {name!r} needs parameter(s) {', '.join(missing)}: set them in its params")
    check = RULES.entry(name).attributes["param_check"] if RULES.get(name) is rule else None
    if check is not None:
        bound = signature.bind_partial("", "", None, **params)
        bound.apply_defaults()
        wanted = inspect.signature(check).parameters
        check(**{key: value for key, value in bound.arguments.items() if key in wanted})


def _kind_problem(default: Any, value: Any) -> str | None:
    """Why `value` cannot stand where `default` is the default; None when it can."""
    if isinstance(default, bool):
        ok, kind = isinstance(value, bool), "true or false"
    elif isinstance(default, (int, float)):
        ok, kind = isinstance(value, (int, float)) and not isinstance(value, bool), "a number"
    elif isinstance(default, str):
        ok, kind = isinstance(value, str), "a string"
    elif isinstance(default, tuple):
        ok, kind = isinstance(value, (list, tuple)), "a list"
    else:
        return None
    if ok:
        return None
    # YAML reads 1e-6 (no dot) as text, a common way for a number to arrive as a string.
    hint = " (YAML reads 1e-6 as text: write 1.0e-6)" if kind == "a number" and isinstance(value, str) else ""
    return f"must be {kind}, got {value!r}{hint}"
