"""A small arithmetic reader: numbers in free text, and expressions over + - * / and parentheses.

Shared by the `arithmetic` reward rule (a response's final number, a prompt's expected answer) and the
`calculator` environment (the expressions the model asks it to work out). Text is never evaluated by Python: expressions go through the
recursive-descent parser below, over exact `Fraction`s so that 0.1 + 0.2 is 0.3.

Grammar (the usual precedence; unary signs bind tighter than * and /):

    expr    := term (("+" | "-") term)*
    term    := unary (("*" | "/") unary)*
    unary   := ("+" | "-")* primary
    primary := NUMBER | "(" expr ")"

NUMBER is digits with an optional decimal part, and optional thousands separators (1,234.5).
`×`, `÷`, `−` (U+2212) and full-width parentheses are read as their ASCII forms.
"""

from __future__ import annotations

import re
from fractions import Fraction

from contracts.errors import UserError

MAX_DEPTH = 64  # nested parentheses; deeper input is rejected rather than risking RecursionError

_TRANSLATE = str.maketrans({"×": "*", "÷": "/", "−": "-", "（": "(", "）": ")"})

_DIGITS = r"(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?"

# A "-" is a sign only where it cannot be a binary minus or a hyphen (not after a digit, an ASCII
# letter or ")"), so the final number of "12-7" is 7. CJK text is not excluded: "答案是-5" reads -5.
_SIGNED_NUMBER = re.compile(rf"(?:(?<![0-9A-Za-z_.)])-)?(?<![0-9.]){_DIGITS}(?![0-9])")

_TOKEN = re.compile(rf"\s*(?:(?P<num>{_DIGITS})|(?P<op>[-+*/()]))")

# Stretches of text made only of expression characters; the expression is found among them.
# A comma followed by a digit is a thousands separator; any other comma is prose ("3, 4 + 5").
_CANDIDATE = re.compile(r"(?:[0-9.+\-*/()\s]|,(?=[0-9]))+")
_BINARY_OP = re.compile(r"[+*/]|[0-9)]\s*-")
_PROSE = " \t\r\n.,"


class ArithmeticSyntaxError(UserError, ValueError):
    """Text is not an expression the grammar accepts; the message says where it went wrong."""


def numbers_in(text: str) -> list[Fraction]:
    """Every number in `text`, in order: ints, decimals, negatives, 1,234-style separators."""
    text = text.translate(_TRANSLATE)
    return [Fraction(m.group(0).replace(",", "")) for m in _SIGNED_NUMBER.finditer(text)]


def final_number(text: str) -> Fraction | None:
    """The last number in `text`, or None when it has none."""
    found = numbers_in(text)
    return found[-1] if found else None


def evaluate(expression: str) -> Fraction:
    """The exact value of `expression`.

    Raises ArithmeticSyntaxError for text outside the grammar and ZeroDivisionError when it
    divides by zero.
    """
    return _Parser(_tokenize(expression.translate(_TRANSLATE))).parse()


def find_expression(text: str) -> str | None:
    """The last stretch of `text` that is an expression with at least one binary operator.

    "What is 3 * (4 - 1)?" gives "3 * (4 - 1)", "12+7=" gives "12+7", "计算 5+6" gives "5+6".
    An expression that divides by zero still counts: it is an expression without a value.
    The expression comes back in ASCII forms (`×` as `*`, full-width parentheses as `(`).
    """
    for match in reversed(list(_CANDIDATE.finditer(text.translate(_TRANSLATE)))):
        candidate = _trim(match.group(0))
        if not _BINARY_OP.search(candidate):
            continue
        try:
            evaluate(candidate)
        except ZeroDivisionError:
            return candidate
        except ArithmeticSyntaxError:
            continue
        return candidate
    return None


def _trim(candidate: str) -> str:
    """Drop sentence punctuation and parentheses that belong to the prose around an expression."""
    text = candidate.strip(_PROSE)
    while text and (text[-1] == "(" or text[-1] == ")" and _paren_excess(text) < 0):
        text = text[:-1].rstrip(_PROSE)
    while text and (text[0] == ")" or text[0] == "(" and _paren_excess(text) > 0):
        text = text[1:].lstrip(_PROSE)
    return text


def _paren_excess(text: str) -> int:
    """How many more "(" than ")" the text has."""
    return text.count("(") - text.count(")")


def _tokenize(text: str) -> list[str]:
    tokens: list[str] = []
    position = 0
    while position < len(text):
        if text[position:].isspace():
            break
        match = _TOKEN.match(text, position)
        if match is None:
            raise ArithmeticSyntaxError(
                f"unexpected character {text[position:].lstrip()[0]!r} at position {position} of {text!r}"
            )
        tokens.append(match.group("num") or match.group("op"))
        position = match.end()
    return tokens


class _Parser:
    """Recursive descent over the token list; one method per grammar rule."""

    def __init__(self, tokens: list[str]):
        self.tokens = tokens
        self.position = 0
        self.depth = 0

    def parse(self) -> Fraction:
        if not self.tokens:
            raise ArithmeticSyntaxError("empty expression")
        value = self.expr()
        if self.position != len(self.tokens):
            raise ArithmeticSyntaxError(f"unexpected {self.tokens[self.position]!r} after a complete expression")
        return value

    def peek(self) -> str | None:
        return self.tokens[self.position] if self.position < len(self.tokens) else None

    def take(self) -> str:
        token = self.peek()
        if token is None:
            raise ArithmeticSyntaxError("expression ends too early")
        self.position += 1
        return token

    def expr(self) -> Fraction:
        value = self.term()
        while self.peek() in ("+", "-"):
            value = value + self.term() if self.take() == "+" else value - self.term()
        return value

    def term(self) -> Fraction:
        value = self.unary()
        while self.peek() in ("*", "/"):
            if self.take() == "*":
                value *= self.unary()
            else:
                divisor = self.unary()
                if divisor == 0:
                    raise ZeroDivisionError("division by zero in the expression")
                value /= divisor
        return value

    def unary(self) -> Fraction:
        # Signs are counted in a loop, not by recursion, so "------5" cannot exhaust the stack.
        negative = False
        while self.peek() in ("+", "-"):
            negative ^= self.take() == "-"
        value = self.primary()
        return -value if negative else value

    def primary(self) -> Fraction:
        token = self.take()
        if token == "(":
            self.depth += 1
            if self.depth > MAX_DEPTH:
                raise ArithmeticSyntaxError(f"parentheses nested deeper than {MAX_DEPTH}")
            value = self.expr()
            if self.take() != ")":
                raise ArithmeticSyntaxError("missing ')'")
            self.depth -= 1
            return value
        if token in ("+", "-", "*", "/", ")"):
            raise ArithmeticSyntaxError(f"expected a number or '(' but found {token!r}")
        return Fraction(token.replace(",", ""))
