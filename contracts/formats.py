"""Prompt data formats: SFT JSONL, XTuner/InternLM conversations, chat messages and verl's layout.

Each record becomes a `PromptRecord`: the messages to render with the model's chat template (an
optional system message, earlier turns as user/assistant pairs, then the final user turn), the
reference completion when the data has one, and where the record came from. A record that does
not fit its format raises `FormatError` with a reason specific enough to fix the data by.

The field helpers at the end (`text_field`, `list_field`, ...) are shared with the preference
formats so that every data file words its reasons the same way.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, TypeVar

import msgspec

from contracts.data_sources import is_columnar, parse_records, read_data
from contracts.jsonl import BadRecord, FormatError

T = TypeVar("T")

PROMPT_FORMATS = ("sft", "xtuner", "chat", "verl")
ROLES = ("system", "user", "assistant")
UNKNOWN_PROMPT_SHAPE = (
    "unknown record shape: expected one of prompt / conversation / messages, or set data.prompt_key to the "
    "column that holds the prompt"
)


class Message(msgspec.Struct, frozen=True):
    """One chat turn; `role` is system, user or assistant."""

    role: str
    content: str


class PromptRecord(msgspec.Struct, frozen=True):
    """A prompt ready to render, with its reference completion and origin."""

    prompt_id: str  # first 16 hex chars of sha256 over the record's canonical JSON
    messages: list[Message]  # system (if any), user/assistant pairs, then the final user turn
    reference: str | None  # SFT "completion", the last XTuner "output", or a final assistant message
    metadata: dict[str, Any]  # the record's "metadata" object plus any keys the format does not use
    source: str  # "FILE:LINE"


def detect_prompt_format(obj: Any) -> str | None:
    """The prompt format a record's keys point to, or None if they fit none."""
    if not isinstance(obj, dict):
        return None
    for key, fmt in (("conversation", "xtuner"), ("messages", "chat"), ("prompt", "sft")):
        if key in obj:
            return "verl" if fmt == "sft" and isinstance(obj["prompt"], list) else fmt
    return None


def record_id(obj: Any) -> str:
    """A stable id for a data record: sha256 of its canonical JSON, first 16 hex characters. Values JSON has
    no type for (a table's timestamps, bytes) count by their text."""
    canonical = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:16]


class Columns(msgspec.Struct, frozen=True):
    """A layout named by its columns (`data.prompt_key`, `data.reference_key`, `data.metadata_keys`), for
    records none of the known formats fits."""

    prompt: str  # a text column (one user turn) or a column of chat messages
    reference: str | None = None  # a dotted path into nested columns: "reward_model.ground_truth"
    metadata: tuple[str, ...] | None = None  # None: every column but the prompt (and a top-level reference)


def parse_columns(obj: Any, columns: Columns, source: str) -> PromptRecord:
    """A record read by the columns its layout names. FormatError naming the column when one is missing or
    holds the wrong type."""
    record = require_object(obj)
    value = record.get(columns.prompt)
    if value is None:
        raise FormatError(f"missing field {columns.prompt!r} (data.prompt_key)")
    if isinstance(value, list):
        messages = [_chat_message(item, f"{columns.prompt}[{i}]") for i, item in enumerate(value)]
        _check_turn_order(messages)
        reference = messages.pop().content if messages[-1].role == "assistant" else None
    else:
        messages, reference = [Message("user", text_field(record, columns.prompt))], None
    if columns.reference is not None:
        reference = _answer_text(dotted(record, columns.reference), columns.reference)
    if columns.metadata is None:
        skipped = {columns.prompt} | ({columns.reference} if columns.reference else set())
        metadata = {k: v for k, v in record.items() if k not in skipped}
    else:
        metadata = {k: record.get(k) for k in columns.metadata}
    return PromptRecord(record_id(record), messages, reference, metadata, source)


def dotted(record: dict[str, Any], path: str) -> Any:
    """The value at a dotted path into nested objects (`reward_model.ground_truth`); None where any part is
    missing."""
    value: Any = record
    for part in path.split("."):
        if not isinstance(value, dict):
            return None
        value = value.get(part)
    return value


def _answer_text(value: Any, where: str) -> str | None:
    """A reference answer as text: strings as they are, numbers written out, None for none."""
    if value is None or isinstance(value, str):
        return value or None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise FormatError(f"{where} must be a string or a number, got {type_name(value)}")
    return str(value)


def parse_prompt(obj: Any, fmt: str, source: str) -> PromptRecord:
    """Turn one decoded record into a PromptRecord; `fmt` is one of PROMPT_FORMATS or "auto".

    Raises FormatError naming the offending field, ValueError for an unknown `fmt`.
    """
    record = require_object(obj)
    if fmt == "auto":
        fmt = detect_prompt_format(record) or ""
        if not fmt:
            raise FormatError(UNKNOWN_PROMPT_SHAPE)
    check_format_name(fmt, PROMPT_FORMATS, "prompt")
    parse, used_keys = _PARSERS[fmt]
    messages, reference = parse(record)
    return PromptRecord(record_id(record), messages, reference, _metadata(record, used_keys), source)


def prompt_record(obj: Any, fmt: str, columns: Columns | None, source: str, *, row: int | None = None) -> PromptRecord:
    """One decoded record as a PromptRecord: by `columns` where the data names its layout, else by `fmt`
    (a format, or "auto" to detect it). A table's row (`row`, its index) gets an id over the row and its
    index: rows of a table may repeat, and their ids must not, without hashing every row up front."""
    if columns is not None:
        record = parse_columns(obj, columns, source)
    else:
        record = parse_prompt(obj, fmt, source)
    if row is None:
        return record
    return msgspec.structs.replace(record, prompt_id=record_id({"row": row, "record": obj}))


def read_prompts(
    path: str | os.PathLike[str],
    fmt: str = "auto",
    params: Mapping[str, Any] | None = None,
    columns: Columns | None = None,
) -> Iterator[PromptRecord | BadRecord]:
    """Stream a prompt source (`params`: its `data.source_params`): a PromptRecord for each good record, a
    BadRecord for each bad one. With "auto" each record's format is detected from its keys, so one file may
    mix formats; `columns` names the layout instead."""
    if fmt != "auto":
        check_format_name(fmt, PROMPT_FORMATS, "prompt")
    return _prompt_records(os.fspath(path), fmt, params, columns)


def _prompt_records(
    spec: str, fmt: str, params: Mapping[str, Any] | None, columns: Columns | None
) -> Iterator[PromptRecord | BadRecord]:
    columnar = is_columnar(spec)
    for n, obj in read_data(spec, params):
        if isinstance(obj, BadRecord):
            yield obj
            continue
        try:
            yield prompt_record(obj, fmt, columns, f"{spec}:{n}", row=n if columnar else None)
        except FormatError as e:
            yield BadRecord(spec, n, str(e))


def read_records(
    path: str | os.PathLike[str], fmt: str, formats: Sequence[str], what: str, parse: Callable[[Any, str, str], T]
) -> Iterator[T | BadRecord]:
    """`parse(obj, fmt, "FILE:LINE")` over every record of `path`, for a data kind (`what`) whose
    format names are `formats`; an unknown `fmt` is a ValueError before the file is opened."""
    if fmt != "auto":
        check_format_name(fmt, formats, what)
    return parse_records(path, lambda obj, source: parse(obj, fmt, source))


def check_format_name(fmt: str, formats: Sequence[str], what: str) -> None:
    if fmt not in formats:
        raise ValueError(f"unknown {what} format {fmt!r}; expected auto or one of {', '.join(formats)}")


def _parse_sft(record: dict[str, Any]) -> tuple[list[Message], str | None]:
    # The seed data embeds "<|SYSTEM|>...<|USER|>..." markers in the prompt; they stay as written.
    prompt = text_field(record, "prompt")
    return [Message("user", prompt)], text_field(record, "completion", required=False)


def _parse_verl(record: dict[str, Any]) -> tuple[list[Message], str | None]:
    # verl's Parquet: chat messages in "prompt", the answer in reward_model.ground_truth; data_source,
    # ability, extra_info and reward_model stay in the metadata, where verl-style rules read them.
    items = list_field(record, "prompt")
    messages = [_chat_message(item, f"prompt[{i}]") for i, item in enumerate(items)]
    _check_turn_order(messages)
    reward_model = record.get("reward_model")
    if reward_model is not None and not isinstance(reward_model, dict):
        raise FormatError(f'field "reward_model" must be an object, got {type_name(reward_model)}')
    return messages, _answer_text((reward_model or {}).get("ground_truth"), "reward_model.ground_truth")


def _parse_xtuner(record: dict[str, Any]) -> tuple[list[Message], str | None]:
    # XTuner writes "system": "" for "no system prompt", so an empty one is not an error.
    system = text_field(record, "system", required=False, allow_empty=True)
    turns = list_field(record, "conversation")
    messages: list[Message] = []
    output = None
    for i, item in enumerate(turns):
        where = f"conversation[{i}]"
        turn = require_object(item, where)
        system = _turn_system(turn, where, i, system)
        last = i == len(turns) - 1
        messages.append(Message("user", text_field(turn, "input", where=where)))
        output = text_field(turn, "output", where=where, required=not last)
        if not last:
            messages.append(Message("assistant", output))
    if system is not None:
        messages.insert(0, Message("system", system))
    return messages, output


def _turn_system(turn: dict[str, Any], where: str, index: int, system: str | None) -> str | None:
    """The system prompt once this turn is read: it may come at the top level or in turn 0."""
    turn_system = text_field(turn, "system", where=where, required=False, allow_empty=True)
    if turn_system is None:
        return system
    if index > 0:
        raise FormatError(f"{where}.system: a system prompt is only allowed at the top level or in the first turn")
    if system is not None and system != turn_system:
        raise FormatError(f'two different system prompts: field "system" and {where}.system')
    return turn_system


def _parse_chat(record: dict[str, Any]) -> tuple[list[Message], str | None]:
    items = list_field(record, "messages")
    messages = [_chat_message(item, f"messages[{i}]") for i, item in enumerate(items)]
    _check_turn_order(messages)
    reference = messages.pop().content if messages[-1].role == "assistant" else None
    return messages, reference


def _chat_message(item: Any, where: str) -> Message:
    message = require_object(item, where)
    role = text_field(message, "role", where=where)
    if role not in ROLES:
        shown = json.dumps(role, ensure_ascii=False)
        raise FormatError(f"{where}.role must be one of {'/'.join(ROLES)}, got {shown}")
    return Message(role, text_field(message, "content", where=where))


def _check_turn_order(messages: list[Message]) -> None:
    """An optional system message, then user and assistant turns alternating from a user turn."""
    start = 1 if messages[0].role == "system" else 0
    if len(messages) == start:
        raise FormatError('field "messages" has no user message')
    for i in range(start, len(messages)):
        role = messages[i].role
        if role == "system":
            raise FormatError(f"messages[{i}].role is system: a system message is only allowed first")
        expected = "user" if (i - start) % 2 == 0 else "assistant"
        if role != expected:
            raise FormatError(
                f"messages[{i}].role must be {expected}, got {role} "
                "(turns alternate user/assistant, starting with user)"
            )


def _metadata(record: dict[str, Any], used_keys: frozenset[str]) -> dict[str, Any]:
    """The record's "metadata" object, plus keys the format does not use, so nothing is lost."""
    explicit = record.get("metadata")
    if explicit is not None and not isinstance(explicit, dict):
        raise FormatError(f'field "metadata" must be an object, got {type_name(explicit)}')
    extra = {k: v for k, v in record.items() if k not in used_keys and k != "metadata"}
    return extra | (explicit or {})


_PARSERS: dict[str, tuple[Callable[[dict[str, Any]], tuple[list[Message], str | None]], frozenset[str]]] = {
    "sft": (_parse_sft, frozenset({"prompt", "completion"})),
    "xtuner": (_parse_xtuner, frozenset({"system", "conversation"})),
    "chat": (_parse_chat, frozenset({"messages"})),
    "verl": (_parse_verl, frozenset({"prompt"})),
}


# Field helpers shared by the data formats. A top-level field is named `field "key"`; a nested one
# by its path, `conversation[1].input`, as the user would look for it in the file.


def type_name(value: Any) -> str:
    """The JSON type of a decoded value, as reasons name it (int and float kept apart)."""
    names = {type(None): "null", bool: "bool", int: "int", float: "float", str: "string", list: "list", dict: "object"}
    return names.get(type(value), type(value).__name__)


def require_object(value: Any, where: str | None = None) -> dict[str, Any]:
    """`value` if it is a JSON object; FormatError otherwise."""
    if not isinstance(value, dict):
        what = "record" if where is None else where
        raise FormatError(f"{what} must be a JSON object, got {type_name(value)}")
    return value


def field_names(key: str, where: str | None = None) -> tuple[str, str]:
    """How reasons name a field, and the reason when it is missing."""
    if where is None:
        return f'field "{key}"', f'missing field "{key}"'
    return f"{where}.{key}", f"{where}.{key} is missing"


def text_field(
    record: dict[str, Any], key: str, *, where: str | None = None, required: bool = True, allow_empty: bool = False
) -> str | None:
    """The string at `record[key]`: FormatError if missing (when required), not a string or blank.

    An optional field that is absent or null gives None, and so does a blank one if `allow_empty`.
    """
    label, missing = field_names(key, where)
    value = record.get(key)
    if value is None:
        if required:
            raise FormatError(missing if key not in record else f"{label} must be a string, got null")
        return None
    if not isinstance(value, str):
        raise FormatError(f"{label} must be a string, got {type_name(value)}")
    if not value.strip():
        if allow_empty:
            return None
        raise FormatError(f"{label} is empty")
    return value


def list_field(record: dict[str, Any], key: str) -> list[Any]:
    """The non-empty list at top-level `record[key]`; FormatError otherwise."""
    label, missing = field_names(key)
    if key not in record:
        raise FormatError(missing)
    value = record[key]
    if not isinstance(value, list):
        raise FormatError(f"{label} must be a list, got {type_name(value)}")
    if not value:
        raise FormatError(f"{label} is empty")
    return value
