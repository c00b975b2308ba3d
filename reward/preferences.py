"""Preference data for reward-model training, in the three formats of the seed documents.

- pairwise: `{"prompt", "response_a", "response_b", "label": 0|1}`, 0 meaning response_a is better;
- multi:    `{"prompt", "responses": [...], "label": k}`, k indexing the best response;
- scored:   `{"prompt", "response_a", "response_b", "score_a", "score_b"}`, the higher score better.

All three become a `PreferenceRecord`, whose `pairs()` are what a Bradley-Terry reward model
trains on.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from typing import Any

import msgspec

from contracts.formats import (
    FormatError,
    check_format_name,
    field_names,
    read_records,
    require_object,
    text_field,
    type_name,
)
from contracts.jsonl import BadRecord

PREFERENCE_FORMATS = ("pairwise", "multi", "scored")
UNKNOWN_PREFERENCE_SHAPE = (
    "unknown record shape: expected response_a/response_b with label or score_a/score_b, or responses with label"
)


class PreferenceRecord(msgspec.Struct, frozen=True):
    """A prompt with two or more responses and which of them is preferred."""

    prompt: str
    responses: list[str]
    best: int  # index of the preferred response (0 when scored responses tie)
    scores: list[float] | None  # one per response, for the scored format
    source: str  # "FILE:LINE"

    def pairs(self) -> list[tuple[int, int, float | None]]:
        """`(chosen, rejected, margin)` for the best response against every other one.

        With scores the margin is the score difference, and responses scored the same as the best
        give no pair (a tie says nothing about which is better); without scores it is None.
        """
        others = [i for i in range(len(self.responses)) if i != self.best]
        if self.scores is None:
            return [(self.best, i, None) for i in others]
        top = self.scores[self.best]
        return [(self.best, i, top - self.scores[i]) for i in others if self.scores[i] < top]


def detect_preference_format(obj: Any) -> str | None:
    """The preference format a record's keys point to, or None if they fit none."""
    if not isinstance(obj, dict):
        return None
    if "responses" in obj:
        return "multi"
    if "score_a" in obj or "score_b" in obj:
        return "scored"
    if "response_a" in obj or "response_b" in obj:
        return "pairwise"
    return None


def parse_preference(obj: Any, fmt: str, source: str) -> PreferenceRecord:
    """Turn one decoded record into a PreferenceRecord; `fmt` is one of PREFERENCE_FORMATS or "auto".

    Raises FormatError naming the offending field, ValueError for an unknown `fmt`.
    """
    record = require_object(obj)
    if fmt == "auto":
        fmt = detect_preference_format(record) or ""
        if not fmt:
            raise FormatError(UNKNOWN_PREFERENCE_SHAPE)
    check_format_name(fmt, PREFERENCE_FORMATS, "preference")
    return _PARSERS[fmt](record, source)


def read_preferences(path: str | os.PathLike[str], fmt: str = "auto") -> Iterator[PreferenceRecord | BadRecord]:
    """Stream a preference file: a PreferenceRecord per good record, a BadRecord per bad one.

    With "auto" each record's format is detected from its keys, so one file may mix formats.
    """
    return read_records(path, fmt, PREFERENCE_FORMATS, "preference", parse_preference)


def _parse_pairwise(record: dict[str, Any], source: str) -> PreferenceRecord:
    prompt = text_field(record, "prompt")
    responses = [text_field(record, "response_a"), text_field(record, "response_b")]
    return PreferenceRecord(prompt, responses, _label(record, 2), None, source)


def _parse_multi(record: dict[str, Any], source: str) -> PreferenceRecord:
    prompt = text_field(record, "prompt")
    label, missing = field_names("responses")
    if "responses" not in record:
        raise FormatError(missing)
    items = record["responses"]
    if not isinstance(items, list):
        raise FormatError(f"{label} must be a list, got {type_name(items)}")
    if len(items) < 2:
        raise FormatError(f"{label} must have at least 2 responses, got {len(items)}")
    responses = [_response(item, i) for i, item in enumerate(items)]
    return PreferenceRecord(prompt, responses, _label(record, len(responses)), None, source)


def _parse_scored(record: dict[str, Any], source: str) -> PreferenceRecord:
    prompt = text_field(record, "prompt")
    responses = [text_field(record, "response_a"), text_field(record, "response_b")]
    scores = [_score(record, "score_a"), _score(record, "score_b")]
    best = 1 if scores[1] > scores[0] else 0
    return PreferenceRecord(prompt, responses, best, scores, source)


def _response(item: Any, index: int) -> str:
    where = f"responses[{index}]"
    if not isinstance(item, str):
        raise FormatError(f"{where} must be a string, got {type_name(item)}")
    if not item.strip():
        raise FormatError(f"{where} is empty")
    return item


def _label(record: dict[str, Any], count: int) -> int:
    """The index of the preferred response, in 0..count-1."""
    label, missing = field_names("label")
    if "label" not in record:
        raise FormatError(missing)
    value = record["label"]
    # bool is an int in Python, but `true` is not a response index.
    if not isinstance(value, int) or isinstance(value, bool):
        raise FormatError(f"{label} must be an int, got {type_name(value)}")
    if not 0 <= value < count:
        raise FormatError(f"{label} is {value}, out of range for {count} responses (0..{count - 1})")
    return value


def _score(record: dict[str, Any], key: str) -> float:
    label, missing = field_names(key)
    if key not in record:
        raise FormatError(missing)
    value = record[key]
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise FormatError(f"{label} must be a number, got {type_name(value)}")
    if not math.isfinite(value):
        raise FormatError(f"{label} must be a finite number, got {json.dumps(value)}")
    return float(value)


_PARSERS = {"pairwise": _parse_pairwise, "multi": _parse_multi, "scored": _parse_scored}
