"""Tool calls read back from the model's text, one parser per model family, by name
(`env.params.tool_parser` of `openai_agent`).

A parser takes the text of the model's turn and returns (content, calls): the text outside the calls
(None when nothing else was written) and each call as OpenAI's `tool_calls` entry, its `arguments` a
JSON string. A call whose JSON does not parse is left in the content, as the model wrote it, so the
agent sees what went wrong. Nothing is evaluated: the calls are parsed as JSON only.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

from contracts.config import ConfigError
from contracts.registry import Registry

ToolCallParser = Callable[[str], tuple[str | None, list[dict[str, Any]]]]


def _callable(name: str, parser: object, field: str) -> ToolCallParser:
    if not callable(parser):
        raise ConfigError(f"{field}: {name} is not a function but {type(parser).__name__}")
    return parser


# A model family whose calls look otherwise brings its own parser as package.module:function.
TOOL_PARSERS: Registry[ToolCallParser] = Registry(
    "tool-call parser", "env.params.tool_parser", user_form="package.module:function", adapt_user=_callable
)

_HERMES = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)


@TOOL_PARSERS.register("hermes")
def hermes(text: str) -> tuple[str | None, list[dict[str, Any]]]:
    """Hermes / Qwen 2-3 calls: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, any number."""
    calls, kept, last = [], [], 0
    for match in _HERMES.finditer(text):
        call = _call(match.group(1), len(calls))
        if call is None:
            continue  # stays in the content
        kept.append(text[last : match.start()])
        last = match.end()
        calls.append(call)
    if not calls:
        return text, []
    kept.append(text[last:])
    content = "".join(kept).strip()
    return content or None, calls


def _call(body: str, index: int) -> dict[str, Any] | None:
    try:
        parsed = json.loads(body)
    except ValueError:
        return None
    if not isinstance(parsed, dict) or not isinstance(parsed.get("name"), str):
        return None
    arguments = parsed.get("arguments", parsed.get("parameters", {}))
    if not isinstance(arguments, str):
        arguments = json.dumps(arguments, ensure_ascii=False)
    return {"id": f"call_{index}", "type": "function", "function": {"name": parsed["name"], "arguments": arguments}}
