"""`calculator`: a tool the model calls by writing `<calc>EXPRESSION</calc>`.

Each model turn is read for a call. A turn with one is answered with `<result>VALUE</result>`, or
`<result>error: REASON</result>` the model can read (not arithmetic, division by zero, too long, no
calls left), and the episode goes on; a turn without one is the model's answer and ends the episode.
The reward workers score that last turn (the arithmetic rule and whatever else `reward.rules` names),
so the calculator gives no reward of its own.

Choices the contract leaves open:
- One call per turn: the first `<calc>` of a turn is evaluated. The model is meant to stop after a call
  and wait for its result; anything after it was written without the result, so it is not read, and
  the observation says so when the turn held more calls.
- A `<calc>` left unclosed at the end of a turn is read to the end of the turn, so a runner that stops
  generation at the `</calc>` stop string (which the engine leaves out of the text) works too.
- After `max_calls` calls, a further call is answered `<result>error: no calls left</result>` and the
  episode goes on, so the model can still give its answer; `env.max_turns` bounds the episode anyway.

The expression goes through `contracts.arith_parser.evaluate`, a recursive-descent parser over numbers,
+ - * / and parentheses, exact in fractions: nothing the model writes is run as code.
"""

from __future__ import annotations

import re
from decimal import Decimal, localcontext
from fractions import Fraction
from typing import Any

from contracts.arith_parser import ArithmeticSyntaxError, evaluate
from contracts.environment import Environment, StepResult
from rollout.environments.registry import ENVIRONMENTS

MAX_EXPRESSION_CHARS = 200  # a longer expression is refused: it bounds the parser's work and the answer's size
SIGNIFICANT_DIGITS = 12  # a value that is not a whole number is shown to this many significant digits

OPEN, CLOSE = "<calc>", "</calc>"
# The first call of a turn: up to its closing tag, or to the end of the turn when it has none.
_CALL = re.compile(re.escape(OPEN) + r"(.*?)(?:" + re.escape(CLOSE) + r"|\Z)", re.DOTALL)


@ENVIRONMENTS.register("calculator")
class Calculator(Environment):
    """Evaluates the model's `<calc>` calls; params: `max_calls`, the calls an episode may make (None: any)."""

    def __init__(self, max_calls: int | None = None):
        if max_calls is not None and (isinstance(max_calls, bool) or not isinstance(max_calls, int) or max_calls < 1):
            raise ValueError(f"calculator: max_calls must be a whole number >= 1 or null, got {max_calls!r}")
        self.max_calls = max_calls
        self.calls = 0

    def reset(self, record: Any) -> str | None:
        """A new episode: no calls made yet; the prompt is left as it is (returns None)."""
        self.calls = 0
        return None

    def step(self, text: str) -> StepResult:
        """The answer to the model's turn `text`: a `<result>` observation for a call, `done` without one.

        `info` holds `tool_call` (the expression as written) and `error` (whether the result is an
        error) for a call, nothing for the final answer. The reward is always None.
        """
        calls = _CALL.findall(text)
        if not calls:
            return StepResult(done=True)
        expression = calls[0].strip()
        self.calls += 1
        if self.max_calls is not None and self.calls > self.max_calls:
            value, error = "error: no calls left", True
        else:
            value, error = calculate(expression)
        observation = f"<result>{value}</result>"
        if len(calls) > 1:
            observation += " (one call per turn: only the first was read)"
        return StepResult(observation=observation, info={"tool_call": expression, "error": error})


def calculate(expression: str) -> tuple[str, bool]:
    """(the value of `expression` as text, False), or ("error: REASON", True) when it has none."""
    if len(expression) > MAX_EXPRESSION_CHARS:
        return f"error: expression longer than {MAX_EXPRESSION_CHARS} characters", True
    try:
        value = evaluate(expression)
    except ZeroDivisionError:
        return "error: division by zero", True
    except ArithmeticSyntaxError as e:
        # The parser's message ends with " of '<the expression>'", which the model has just written.
        return f"error: {str(e).partition(' of ')[0]}", True
    return format_number(value), False


def format_number(value: Fraction) -> str:
    """A whole number in all its digits ("12", "-3"), anything else in decimal notation to
    SIGNIFICANT_DIGITS significant digits with trailing zeros dropped ("0.333333333333", "2.5")."""
    if value.denominator == 1:
        return str(value.numerator)
    with localcontext() as context:
        context.prec = SIGNIFICANT_DIGITS
        decimal = Decimal(value.numerator) / Decimal(value.denominator)
    text = format(decimal, "f")  # "f": never an exponent, which the parser would not read back
    return text.rstrip("0").rstrip(".") if "." in text else text
