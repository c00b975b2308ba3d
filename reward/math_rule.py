"""Rule `math`: the response's final answer checked against the reference's with math-verify.

The final answer is read from the response by its marker, in this order of precedence (the forms
`answer_forms` names; all three by default):

- `boxed`: the content of the last `\\boxed{...}` or `\\fbox{...}`, braces matched (nested groups and
  escaped `\\{`, `\\}` included);
- `hash`: the rest of the line after the last `####` (GSM8K's form);
- `answer_is`: the rest of the sentence after the last "answer is" ("The answer is 12.",
  "the final answer is $x+1$"), any case.

The first form the response has decides: when its last occurrence cannot be read (an unclosed
`\\boxed{5`, an empty or over-long answer, braces nested too deep) the response has no answer, rather
than one taken from an earlier, superseded marker. With `last_number_fallback` a response without a
readable answer falls back to its last number; it is off by default, so a truncated response scores 0.

A reference that is a whole solution (it holds `\\boxed{` or `####`: MATH's and GSM8K's forms) gives
its answer the same way; any other reference is the answer itself, read as LaTeX ("\\frac{1}{2}",
"72", "$x+1$", "(1, 2]"). Both answers go to math-verify as the content of a `\\boxed{}` and are
compared by `math_verify.verify(reference, response)`: fractions, decimals, percentages, radicals,
sets, intervals, equations and expressions, by value. The score is 1 for an equal answer,
`format_score` (0 by default) for an answer math-verify parsed that is wrong, 0 for no answer or one
math-verify cannot parse. A record without a usable reference raises ValueError: that is the data's
fault, not the response's, and the scorer counts the component as failed.

Bounds: a response longer than `max_response_chars` has no answer (its length is bounded by the
sampling limits long before this; 1 MB of text is refused without being scanned); an answer is at
most MAX_ANSWER_CHARS characters and MAX_BRACE_DEPTH nested groups, so the brace scan is short; and
parsing and comparing run in a verifier process with `timeout_s` to answer.

Why a process and not a thread: a short answer can make sympy run for ever (`9^{9^{9^{9}}}`), and
most of that time is Python's big-integer arithmetic, C code that holds the GIL throughout. A thread
waiting on it with a timeout cannot even wake up to give up, so the scorer would freeze; and a
thread cannot be killed, so each runaway would keep a CPU and its memory until it ended, if ever.
A process has its own GIL, can be killed, and gets its own memory limit (VERIFIER_MEMORY_BYTES,
so an exponent that needs gigabytes raises MemoryError there instead of taking the node's memory).
Each scoring process keeps a few such verifiers (MAX_VERIFIERS, one while calls are sequential, as
the scorer makes them); a call takes an idle one, sends it the two answers over a pipe and waits
`timeout_s` for the result. A verifier that does not answer in time is killed and replaced at once
(the replacement imports in its own process while scoring goes on) and the sample scores 0; one
that dies on a request (MemoryError where Python cannot recover, a crash) is treated the same way.
The verifier also sets an alarm of its own for each request, a little after `timeout_s`, whose
default action ends it: a verifier whose scoring process died mid-request does not run on.

math-verify's own timeouts are turned off (`parsing_timeout=None`, `timeout_seconds=None`): they
use `signal.alarm`, which only the main thread can set and which cannot interrupt C code either.
Only math-verify's LaTeX extraction is used: its plain-expression extraction runs sympy's
`parse_expr`, which evaluates Python, and nothing the model writes is ever evaluated as code here.

math-verify and sympy are imported by the verifier process, which the registry entry's `prepare`
hook starts when a scorer is built and waits for until it has parsed a first answer, so the first
sample's time limit is not spent importing.
"""

from __future__ import annotations

import atexit
import json
import math
import os
import re
import select
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from functools import lru_cache
from importlib.util import find_spec
from pathlib import Path
from typing import Any

from reward.rules import RULES

ANSWER_FORMS = ("boxed", "hash", "answer_is")
MAX_ANSWER_CHARS = 1_000
MAX_BRACE_DEPTH = 64
MAX_VERIFIERS = 4
VERIFIER_MEMORY_BYTES = 1 << 30
VERIFIER_START_TIMEOUT_S = 60.0
# How long after `timeout_s` a verifier ends itself: its scoring process normally kills it first.
ALARM_GRACE_S = 2.0

_BOXED_OPENERS = ("\\boxed{", "\\fbox{")
_HASH = "####"
_ANSWER_IS = re.compile(r"answer\s+is", re.IGNORECASE)
# The last number: "1,000" with its separators, "-3", "2.5".
_NUMBER = re.compile(r"-?(?:[0-9]{1,3}(?:,[0-9]{3})+|[0-9]+)(?:\.[0-9]+)?")
# A `$` that is not `\$`: a math-mode delimiter or a currency sign, neither part of the value.
_UNESCAPED_DOLLAR = re.compile(r"(?<!\\)\$")
_DELIMITERS = (("\\(", "\\)"), ("\\[", "\\]"))
_VERIFIER_MODULE = "reward.math_rule"
_PACKAGE_ROOT = str(Path(__file__).resolve().parents[1])


# --- the rule ----------------------------------------------------------------------------------


def _check_math(
    answer_forms: Sequence[str],
    last_number_fallback: bool,
    format_score: float,
    timeout_s: float,
    max_response_chars: int,
) -> tuple[str, ...]:
    """The answer forms as a tuple, after checking every param; ValueError naming the bad one."""
    if isinstance(answer_forms, str) or not answer_forms or not all(f in ANSWER_FORMS for f in answer_forms):
        raise ValueError(
            f"math: answer_forms must be a non-empty list of {', '.join(ANSWER_FORMS)}, got {answer_forms!r}"
        )
    if not isinstance(last_number_fallback, bool):
        raise ValueError(f"math: last_number_fallback must be true or false, got {last_number_fallback!r}")
    if not math.isfinite(format_score):
        raise ValueError(f"math: format_score must be a finite number, got {format_score!r}")
    if not (math.isfinite(timeout_s) and timeout_s > 0):
        raise ValueError(f"math: timeout_s must be a finite number of seconds > 0, got {timeout_s!r}")
    if not (isinstance(max_response_chars, int) and max_response_chars >= 1):
        raise ValueError(f"math: max_response_chars must be a whole number >= 1, got {max_response_chars!r}")
    if not _math_verify_installed():
        raise ValueError("math: needs the math-verify package: pip install math-verify")
    return tuple(answer_forms)


@lru_cache(maxsize=1)
def _math_verify_installed() -> bool:
    """Whether the verifier will find math-verify; asked once, as finding it searches the path."""
    return find_spec("math_verify") is not None


def prepare() -> None:
    """Starts a verifier and waits until it is ready, so that no sample's time limit is spent on
    importing sympy; RuntimeError with the verifier's error output when it cannot start."""
    _VERIFIERS.prepare()


@RULES.register("math", param_check=_check_math, prepare=prepare)
def math_answer(
    prompt: str,
    response: str,
    record: Any,
    answer_forms: Sequence[str] = ANSWER_FORMS,
    last_number_fallback: bool = False,
    format_score: float = 0.0,
    timeout_s: float = 3.0,
    max_response_chars: int = 100_000,
) -> float:
    """1.0 when the response's final answer equals the reference's by math-verify, `format_score`
    when it is a parsed but different answer, else 0.0 (no answer, unparseable, or not decided within
    `timeout_s`). See the module docstring for the forms read. ValueError when the record has no
    reference or the reference gives no answer.

    The default `timeout_s` (3) leaves room inside the scorer's default `reward.timeout_s` (5): a
    call the scorer gives up on first is a failed component (NaN), not a 0.
    """
    forms = _check_math(answer_forms, last_number_fallback, format_score, timeout_s, max_response_chars)
    gold = reference_answer(getattr(record, "reference", None))
    answer = final_answer(response, forms, last_number_fallback=last_number_fallback, max_chars=max_response_chars)
    if answer is None:
        return 0.0
    outcome = _VERIFIERS.compare(gold, answer, timeout_s)
    if outcome is None:  # ran past timeout_s, or took its verifier down with it
        return 0.0
    if not outcome["gold"]:
        raise ValueError(f"math: math-verify cannot read the reference's answer {gold[:200]!r}")
    if outcome["correct"]:
        return 1.0
    return float(format_score) if outcome["parsed"] else 0.0


# --- reading answers ---------------------------------------------------------------------------


def final_answer(
    text: str, forms: Sequence[str] = ANSWER_FORMS, *, last_number_fallback: bool = False, max_chars: int = 100_000
) -> str | None:
    """The final answer `text` states in the first of `forms` it uses (see the module docstring),
    else its last number where `last_number_fallback`, else None. Text over `max_chars` has none."""
    if len(text) > max_chars:
        return None
    for form in ANSWER_FORMS:  # in order of precedence, whatever order the config lists them in
        if form not in forms:
            continue
        present, answer = _READERS[form](text)
        if present:
            if answer is not None:
                return answer
            break
    return _last_number(text) if last_number_fallback else None


def reference_answer(reference: Any) -> str:
    """The answer a reference gives: from its last `\\boxed{}` or `####` when it is a whole solution,
    else the whole reference. ValueError when there is none to read."""
    if isinstance(reference, (int, float)) and not isinstance(reference, bool):
        reference = str(reference)
    if not isinstance(reference, str) or not reference.strip():
        raise ValueError(f"math: the record has no reference answer to compare with (reference: {reference!r})")
    for reader in (_boxed, _hash):
        present, answer = reader(reference)
        if present:
            if answer is None:
                raise ValueError(f"math: cannot read the final answer of the reference {reference[-200:]!r}")
            return answer
    answer = _clean(reference)
    if answer is None:
        raise ValueError(
            f"math: the reference {reference[:200]!r} is not an answer of at most {MAX_ANSWER_CHARS} characters "
            "with balanced braces; give it as the answer itself, or a solution ending in #### or \\boxed{}"
        )
    return answer


def _boxed(text: str) -> tuple[bool, str | None]:
    """Whether `text` has a `\\boxed{`/`\\fbox{`, and the content of the last one (None: unreadable)."""
    starts = [(text.rfind(opener), opener) for opener in _BOXED_OPENERS]
    at, opener = max(starts)
    if at < 0:
        return False, None
    content = _group(text, at + len(opener) - 1)
    return True, None if content is None else _clean(content)


def _hash(text: str) -> tuple[bool, str | None]:
    """Whether `text` has a `####`, and the rest of the line after the last one."""
    at = text.rfind(_HASH)
    if at < 0:
        return False, None
    return True, _clean(_line_after(text, at + len(_HASH)))


def _answer_is(text: str) -> tuple[bool, str | None]:
    """Whether `text` says "answer is", and the rest of the sentence after the last one."""
    found = list(_ANSWER_IS.finditer(text))
    if not found:
        return False, None
    line = _line_after(text, found[-1].end())
    if line is None:
        return True, None
    line = line.lstrip().removeprefix(":")
    end = re.search(r"\.\s", line)  # the sentence ends; "2.5" does not end it
    return True, _clean(line[: end.start()] if end else line)


_READERS = {"boxed": _boxed, "hash": _hash, "answer_is": _answer_is}


def _line_after(text: str, start: int) -> str | None:
    """`text` from `start` to the end of its line; None when that is over MAX_ANSWER_CHARS."""
    end = text.find("\n", start, start + MAX_ANSWER_CHARS + 1)
    if end < 0:
        end = len(text)
    return text[start:end] if end - start <= MAX_ANSWER_CHARS else None


def _group(text: str, open_at: int) -> str | None:
    """The content of the brace group opened at `text[open_at]`; None when it is not closed within
    MAX_ANSWER_CHARS characters or nests deeper than MAX_BRACE_DEPTH. `\\{`, `\\}` and `\\\\` are
    escapes, not braces."""
    depth = 0
    i, end = open_at, min(len(text), open_at + MAX_ANSWER_CHARS + 2)
    while i < end:
        char = text[i]
        if char == "\\":
            i += 2
            continue
        if char == "{":
            depth += 1
            if depth > MAX_BRACE_DEPTH:
                return None
        elif char == "}":
            depth -= 1
            if depth == 0:
                return text[open_at + 1 : i]
        i += 1
    return None


def _balanced(text: str) -> bool:
    """Whether the braces of `text` close in order, within MAX_BRACE_DEPTH."""
    wrapped = "{" + text + "}"
    return _group(wrapped, 0) == text


def _clean(answer: str | None) -> str | None:
    """The answer without its surroundings (spaces, `$`, `\\(...\\)`, `**`, a closing full stop);
    None when nothing is left, it is too long, or its braces do not balance."""
    if answer is None:
        return None
    answer = answer.strip().strip("*").strip()
    for left, right in _DELIMITERS:
        if answer.startswith(left) and answer.endswith(right):
            answer = answer[len(left) : -len(right)]
    answer = _UNESCAPED_DOLLAR.sub("", answer).strip().rstrip(".").strip()
    if not answer or len(answer) > MAX_ANSWER_CHARS or not _balanced(answer):
        return None
    return answer


def _last_number(text: str) -> str | None:
    """The last number written in `text` ("1,000", "-2.5"), or None."""
    found = _NUMBER.findall(text)
    if not found or len(found[-1]) > MAX_ANSWER_CHARS:
        return None
    return found[-1]


# --- the verifiers -----------------------------------------------------------------------------


class _Verifier:
    """One verifier process, its pipes, and what it has written that is not yet a whole line."""

    def __init__(self) -> None:
        self.errors = tempfile.TemporaryFile()  # its stderr, read back when it fails to start
        env = dict(os.environ)
        # The scoring process may have found this package on a path of its own (a Ray working dir).
        env["PYTHONPATH"] = os.pathsep.join(p for p in (_PACKAGE_ROOT, env.get("PYTHONPATH", "")) if p)
        self.process = subprocess.Popen(
            [sys.executable, "-m", _VERIFIER_MODULE],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.errors,
            env=env,
            bufsize=0,
        )
        self.ready = False
        self._pending = b""

    def read_line(self, timeout_s: float) -> bytes | None:
        """The next line it writes, None when none comes within `timeout_s`; EOFError when it exits."""
        deadline = time.monotonic() + timeout_s
        fd = self.process.stdout.fileno()
        poller = select.poll()  # not select.select: a big process's descriptors may pass FD_SETSIZE
        poller.register(fd, select.POLLIN)
        while b"\n" not in self._pending:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not poller.poll(max(1, int(remaining * 1000))):
                return None
            chunk = os.read(fd, 65536)
            if not chunk:
                raise EOFError("the verifier exited")
            self._pending += chunk
        line, _, self._pending = self._pending.partition(b"\n")
        return line

    def send(self, request: dict[str, Any]) -> None:
        self.process.stdin.write(json.dumps(request).encode() + b"\n")

    def error_output(self) -> str:
        self.errors.seek(0)
        return self.errors.read()[-2000:].decode(errors="replace").strip() or "(no error output)"

    def kill(self) -> None:
        self.process.kill()
        self.process.wait()
        for pipe in (self.process.stdin, self.process.stdout, self.errors):
            pipe.close()


class _Verifiers:
    """The verifier processes of this scoring process: idle ones, and how many there are in all."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._idle: list[_Verifier] = []
        self._count = 0

    def prepare(self) -> None:
        self._give_back(self._take_ready())

    def compare(self, gold: str, answer: str, timeout_s: float) -> dict[str, bool] | None:
        """math-verify's reading of the two answers ({"gold", "parsed", "correct"}), or None when the
        verifier did not answer within `timeout_s` or died; a verifier that failed is replaced."""
        request = {"gold": gold, "answer": answer, "alarm_s": timeout_s + ALARM_GRACE_S}
        verifier = self._take_ready()
        try:
            verifier.send(request)
        except BrokenPipeError:  # it died while idle, before this request: try once on a fresh one
            self._discard(verifier)
            verifier = self._take_ready()
            verifier.send(request)
        try:
            line = verifier.read_line(timeout_s)
        except EOFError:
            line = None
        if line is None:
            self._discard(verifier, replace=True)
            return None
        self._give_back(verifier)
        return json.loads(line)

    def close(self) -> None:
        """Ends the idle verifiers; busy ones end when their caller kills them or their alarm rings."""
        with self._lock:
            idle, self._idle = self._idle, []
            self._count -= len(idle)
        for verifier in idle:
            verifier.kill()

    def _take(self) -> _Verifier:
        with self._lock:
            while self._idle:
                verifier = self._idle.pop()
                if verifier.process.poll() is None:
                    return verifier
                self._count -= 1
                verifier.kill()
            if self._count >= MAX_VERIFIERS:
                raise RuntimeError(
                    f"math: all {MAX_VERIFIERS} verifiers are busy: scoring calls overlap, or the scorer gave "
                    "up on calls still running; keep the rule's timeout_s below reward.timeout_s"
                )
            self._count += 1
        try:
            return _Verifier()
        except BaseException:
            with self._lock:
                self._count -= 1
            raise

    def _take_ready(self) -> _Verifier:
        """An idle or new verifier, once it has finished starting; RuntimeError when it cannot start."""
        verifier = self._take()
        if verifier.ready:
            return verifier
        try:
            line = verifier.read_line(VERIFIER_START_TIMEOUT_S)
        except EOFError:
            line = None
        if line != b"ready":
            message = f"math: the math-verify process did not start within {VERIFIER_START_TIMEOUT_S:g}s: "
            message += verifier.error_output()
            self._discard(verifier)
            raise RuntimeError(message)
        verifier.ready = True
        return verifier

    def _give_back(self, verifier: _Verifier) -> None:
        with self._lock:
            self._idle.append(verifier)

    def _discard(self, verifier: _Verifier, *, replace: bool = False) -> None:
        """Kills `verifier`; with `replace`, starts another now, so that it imports while scoring goes on."""
        verifier.kill()
        with self._lock:
            self._count -= 1
        if replace:
            try:
                self._give_back(self._take())
            except (OSError, RuntimeError):  # the next call starts one, or reports why it cannot
                pass


_VERIFIERS = _Verifiers()
atexit.register(_VERIFIERS.close)


# --- the verifier process ----------------------------------------------------------------------


def serve() -> None:
    """The verifier's loop: one JSON request a line on stdin, one JSON answer a line on stdout.

    It writes `ready` once math-verify is imported and has parsed a first answer. Each request is
    {"gold", "answer", "alarm_s"}; the answer is {"gold": parsed, "parsed": parsed, "correct": equal}.
    It ends when stdin closes (its scoring process is gone), or by SIGALRM's default action when a
    request runs past `alarm_s`.
    """
    # The answers go out on a copy of stdout; stdout itself becomes stderr, so that nothing a library
    # prints (from Python or from C) lands among them.
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    try:
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (VERIFIER_MEMORY_BYTES, VERIFIER_MEMORY_BYTES))
    except (ImportError, ValueError, OSError):  # a lower hard limit, or no such limit here
        pass
    signal.signal(signal.SIGALRM, signal.SIG_DFL)

    import logging

    # math-verify warns once that its own timeout is off: this process is the timeout.
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    from math_verify import LatexExtractionConfig, parse, verify

    config = [LatexExtractionConfig(boxed_match_priority=0)]

    def read(answer: str) -> list[Any]:
        return parse("\\boxed{" + answer + "}", extraction_config=config, parsing_timeout=None)

    verify(read("1"), read("\\frac{2}{2}"), timeout_seconds=None)  # builds the LaTeX grammar now
    out.write(b"ready\n")
    out.flush()
    for line in sys.stdin.buffer:
        request = json.loads(line)
        signal.setitimer(signal.ITIMER_REAL, request["alarm_s"])
        gold, answer = read(request["gold"]), read(request["answer"])
        correct = bool(gold and answer) and verify(gold, answer, timeout_seconds=None)
        signal.setitimer(signal.ITIMER_REAL, 0)
        parsed = any(not isinstance(value, str) for value in answer)
        out.write(json.dumps({"gold": bool(gold), "parsed": parsed, "correct": bool(correct)}).encode() + b"\n")
        out.flush()


if __name__ == "__main__":
    serve()
