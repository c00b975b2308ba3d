"""One agent episode's calls, captured token by token (the `openai_agent` environment).

Each call's prompt is rendered by the model's chat template, and what the engine sampled is kept as it
was sampled: tokens and their logprobs. A call whose conversation extends the previous one (the previous
call's messages, then the assistant message it returned, then more) is stitched onto the episode's row:
the sampled tokens stay as they were, never re-tokenized, and only the messages the agent added are
rendered, as context (mask 0). A call that does not extend the previous one (a fresh context, a
summarized history) starts a new segment of the episode: a row of its own, whose prompt is that call's.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from contracts.errors import UserError
from contracts.formats import PromptRecord


class RequestError(UserError):
    """A call the endpoint answers with an OpenAI-shaped error: `status` (400, 404, 409) and `message`
    (the agent's mistake, which it sees as the openai client's exception)."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.kind = status, message, kind


@dataclass(slots=True)
class Segment:
    """A finished segment of an episode: one conversation's calls, stitched into one row."""

    prompt_ids: list[int]
    prompt_text: str
    response: list[int]
    logprobs: list[float]
    mask: list[int]
    calls: int
    final_text: str
    finish: str


@dataclass(slots=True, eq=False)  # by identity: episodes are kept in sets
class AgentEpisode:
    place: tuple[int, int, int]  # (batch, prompt, sample)
    record: PromptRecord
    seed: int | None
    id: str
    prompt_ids: list[int] | None = None  # the first call's prompt
    prompt_text: str = ""
    response: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    mask: list[int] = field(default_factory=list)
    calls: int = 0  # the episode's, every segment's
    segment_calls: int = 0  # the current segment's
    segments: list[Segment] = field(default_factory=list)  # the finished ones, in order
    history: Any = None  # what the next call must start with to extend: normalized messages, or text
    tools_key: str = ""  # the tools the conversation was rendered with: other tools do not extend it
    reply_ended: bool = True  # the last reply ended with the model's eos
    final_text: str = ""
    last_finish: str = "stop"
    busy: bool = False  # a call in flight: a second one at once is not this conversation's next turn
    reward: float | None = None
    finish: str | None = None
    error: str | None = None
    task: Any = None  # the agent's asyncio task
    pending: Any = None  # the future of the call in the engine, failed if the episode ends first

    def new_segment(self) -> None:
        """The current segment is finished (the next call starts a fresh context): kept, and a new one begun."""
        self.segments.append(
            Segment(
                self.prompt_ids,
                self.prompt_text,
                self.response,
                self.logprobs,
                self.mask,
                self.segment_calls,
                self.final_text,
                self.last_finish,
            )
        )
        self.prompt_ids, self.prompt_text, self.final_text = None, "", ""
        self.response, self.logprobs, self.mask = [], [], []
        self.segment_calls = 0

    def end(self, finish: str, error: str | None = None) -> bool:
        """The episode ends (once: the first cause is kept); True if this call ended it."""
        if self.finish is not None:
            return False
        self.finish, self.error = finish, error
        if self.pending is not None and not self.pending.done():
            self.pending.set_exception(RequestError(409, f"this episode ended ({finish})", "conflict"))
        return True


def record_dict(record: PromptRecord) -> dict[str, Any]:
    """The record as the agent gets it: plain data, its messages as OpenAI's `{role, content}`."""
    return {
        "messages": [{"role": m.role, "content": m.content} for m in record.messages],
        "reference": record.reference,
        "metadata": dict(record.metadata),
    }


def message_text(content: Any) -> str:
    """A message's content as text: a string, None, or OpenAI's list of parts (their text joined)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if isinstance(part, dict) and part.get("type") in ("text", "input_text", "output_text"):
                parts.append(str(part.get("text", "")))
            else:
                raise RequestError(400, "messages: only text content is served (no images, audio or files)")
        return "".join(parts)
    raise RequestError(400, f"messages: content must be a string or a list of text parts, got {type(content).__name__}")


def normalize_messages(messages: Any) -> list[dict[str, Any]]:
    """The request's messages as the chat template gets them: role, content as text, and where present
    `tool_calls` (name and JSON arguments) and `tool_call_id`; other keys an SDK sends are dropped."""
    if not isinstance(messages, list) or not messages:
        raise RequestError(400, "messages must be a non-empty list")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise RequestError(400, f"messages[{i}] must be an object with a string role")
        role = "system" if message["role"] == "developer" else message["role"]
        if role not in ("system", "user", "assistant", "tool"):
            raise RequestError(400, f"messages[{i}].role must be system, developer, user, assistant or tool")
        item: dict[str, Any] = {"role": role, "content": message_text(message.get("content"))}
        calls = message.get("tool_calls")
        if calls:
            item["tool_calls"] = [_tool_call(call, i) for call in calls]
        if message.get("tool_call_id") is not None:
            item["tool_call_id"] = str(message["tool_call_id"])
        out.append(item)
    return out


def _tool_call(call: Any, i: int) -> dict[str, Any]:
    function = call.get("function") if isinstance(call, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        raise RequestError(400, f"messages[{i}].tool_calls: each needs function.name and function.arguments")
    arguments = function.get("arguments", "{}")
    if not isinstance(arguments, str):
        arguments = json.dumps(arguments, ensure_ascii=False)
    return {
        "id": str(call.get("id", "")),
        "type": "function",
        "function": {"name": function["name"], "arguments": arguments},
    }


def same_turns(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether two normalized messages are the same turn: role, text, and tool calls by name and
    arguments (compared as JSON values, so an SDK that re-serializes them still extends). Call ids are
    not compared: an SDK may rewrite them, and the template renders none of them."""
    if a["role"] != b["role"] or a["content"] != b["content"]:
        return False
    calls_a, calls_b = a.get("tool_calls") or [], b.get("tool_calls") or []
    if len(calls_a) != len(calls_b):
        return False
    return all(
        x["function"]["name"] == y["function"]["name"]
        and _json(x["function"]["arguments"]) == _json(y["function"]["arguments"])
        for x, y in zip(calls_a, calls_b)
    )


def _json(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def extends(history: list[dict[str, Any]], messages: list[dict[str, Any]]) -> bool:
    """Whether `messages` start with `history` (the previous call's messages and its reply) and add more."""
    return len(messages) > len(history) and all(same_turns(h, m) for h, m in zip(history, messages))


class ChatRendering:
    """The chat template's text of a call and of what an extending call adds after the last reply."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.backend = getattr(tokenizer, "backend_tokenizer", None)  # a fast tokenizer's own (`tokenizers`)
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("the model's tokenizer has no chat template; openai_agent needs one")
        # What the template writes after an assistant turn's text (its eos and separator, for most
        # templates): put back after a reply the engine cut before the model wrote its eos.
        user = [{"role": "user", "content": "x"}]
        head = self.text(user, None, generation=True) + "y"
        whole = self.text([*user, {"role": "assistant", "content": "y"}], None, generation=False)
        self.closing = whole[len(head) :] if whole.startswith(head) else (tokenizer.eos_token or "")
        self.eos = tokenizer.eos_token or ""

    def text(self, messages: list[dict[str, Any]], tools: list | None, *, generation: bool) -> str:
        return self.tokenizer.apply_chat_template(
            messages, tools=tools or None, tokenize=False, add_generation_prompt=generation
        )

    def ids(self, text: str) -> list[int]:
        # The template writes the special tokens (bos) itself; adding them again would double them.
        backend = self.backend
        # The same ids, without the wrapper's per-call work (half the call's time); not while a caller has left
        # truncation or padding set on it, which the wrapper would reset first.
        if backend is not None and backend.truncation is None and backend.padding is None:
            return backend.encode(text, add_special_tokens=False).ids
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def added(
        self, history: list[dict[str, Any]], messages: list[dict[str, Any]], tools, reply_ended: bool
    ) -> str | None:
        """The text after the last reply's sampled tokens through the next turn's generation prompt, or
        None when the template does not render the conversation so far as a prefix of this call's."""
        before = self.text(history, tools, generation=False)
        whole = self.text(messages, tools, generation=True)
        if not whole.startswith(before):
            return None
        closing = self.closing
        if reply_ended and self.eos and closing.startswith(self.eos):
            closing = closing[len(self.eos) :]  # the model wrote its eos: it is among the sampled tokens
        return closing + whole[len(before) :]
