"""`rollout validate`: check data sources, report every bad record as `SOURCE:N: reason`.

Each source is any that `data.prompts` takes (a file, a directory or glob, `hf:`, `reasoning_gym:`). Each is
prompt data or preference data, told apart by the keys of its first record whose
shape is recognised; every record is then checked against that kind's formats. The report is
one line per bad record as it is found, then a summary per file and a count per reason category.
"""

from __future__ import annotations

import os
import sys
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, TextIO

from contracts.config import DataConfig
from contracts.data_sources import DataSourceError, data_source, read_data
from contracts.formats import PromptRecord, detect_prompt_format, read_prompts
from contracts.jsonl import BadRecord
from reward.preferences import detect_preference_format, read_preferences
from rollout.driver.prompts import columns

# First match wins: the more specific phrases come before the generic "must be" / "is empty".
_CATEGORIES = (
    ("not valid UTF-8", "not UTF-8"),
    ("invalid JSON", "bad JSON"),
    ("unknown record shape", "unknown record shape"),
    ("must be a JSON object", "not a JSON object"),
    ("longer than the maximum", "prompt too long"),
    ("could not be rendered", "prompt cannot be rendered"),
    ("out of range", "label out of range"),
    ("at least 2 responses", "fewer than 2 responses"),
    ("must be a number", "non-numeric score"),
    ("must be a finite number", "non-numeric score"),
    ("turns alternate", "bad turn order"),
    ("system message is only allowed first", "bad turn order"),
    ("has no user message", "bad turn order"),
    ("system prompt", "bad system prompt"),
    ("must be one of", "bad role"),
    ("missing", "missing field"),
    ("is empty", "empty text"),
    ("must be a", "wrong type"),
)


def validate_files(
    paths: list[str],
    *,
    prompt_length: Callable[[PromptRecord], int] | None = None,
    max_prompt_tokens: int | None = None,
    out: TextIO | None = None,
    data: DataConfig | None = None,
) -> int:
    """Check every record of every source and print the report to `out` (stdout); 0 if all valid, else 1.

    `prompt_length` (the rendered prompt's token count) with `max_prompt_tokens` also reports
    prompts that are too long. `data` (a job's data section) gives the sources' params and the layout
    `data.prompt_key` names. A source that is missing, unreadable or has no records fails too.
    """
    out = out or sys.stdout
    data = data or DataConfig()
    summaries: list[str] = []
    reasons: Counter[str] = Counter()
    failed = False
    for file in paths:
        problem = _unreadable(file)
        if problem:
            print(f"{file}: {problem}", file=out)
            failed = True
            continue
        try:
            records, bad = _check_file(file, prompt_length, max_prompt_tokens, out, data)
        except DataSourceError as e:
            print(e, file=out)
            failed = True
            continue
        reasons.update(bad)
        failed |= records == 0 or bad.total() > 0
        summaries.append(f"{file}: no records" if records == 0 else f"{file}: {records} records, {bad.total()} bad")
    for line in summaries:
        print(line, file=out)
    if reasons:
        by_count = sorted(reasons.items(), key=lambda kv: (-kv[1], kv[0]))
        counts = ", ".join(f"{name} {n}" for name, n in by_count)
        print(f"bad records by reason: {counts}", file=out)
    return 1 if failed else 0


def detect_data_kind(file: str, params: Mapping[str, Any] | None = None) -> str:
    """The kind of data in a file, "preference" or "prompt", from its first recognised record.

    Preference records carry a "prompt" too, so their keys are checked first. A file with no
    recognisable record is treated as prompt data (its records are then reported as unknown).
    """
    for _, obj in read_data(file, params):
        if detect_preference_format(obj):
            return "preference"
        if detect_prompt_format(obj):
            return "prompt"
    return "prompt"


def reason_category(reason: str) -> str:
    """The summary category of a bad record's reason."""
    return next((name for phrase, name in _CATEGORIES if phrase in reason), "other")


def _unreadable(file: str) -> str | None:
    if data_source(file) in ("directory", "glob") or not os.path.exists(file) and ":" in file:
        return None  # not one file: its source says what it cannot read
    try:
        open(file, "rb").close()
    except FileNotFoundError:
        return "no such file"
    except IsADirectoryError:
        return "is a directory, not a data file"
    except OSError as e:
        return f"cannot be read ({e.strerror})"
    return None


def _check_file(
    file: str,
    prompt_length: Callable[[PromptRecord], int] | None,
    max_prompt_tokens: int | None,
    out: TextIO,
    data: DataConfig,
) -> tuple[int, Counter[str]]:
    """Print the source's bad records; return its record count and bad records by category."""
    if data.prompt_key is None and detect_data_kind(file, data.source_params) == "preference":
        records: Iterable[object] = read_preferences(file)
    else:
        records = read_prompts(file, data.format, data.source_params, columns(data))
        if prompt_length is not None and max_prompt_tokens is not None:
            records = _length_checked(records, prompt_length, max_prompt_tokens)
    count, bad = 0, Counter[str]()
    for record in records:
        count += 1
        if isinstance(record, BadRecord):
            print(record, file=out)
            bad[reason_category(record.reason)] += 1
    return count, bad


def _length_checked(
    records: Iterable[PromptRecord | BadRecord], prompt_length: Callable[[PromptRecord], int], max_tokens: int
) -> Iterator[PromptRecord | BadRecord]:
    """Pass records through, turning prompts longer than `max_tokens` into bad records."""
    for record in records:
        if isinstance(record, BadRecord):
            yield record
            continue
        file, _, line = record.source.rpartition(":")
        try:
            tokens = prompt_length(record)
        # The length comes from the model's chat template, which raises on conversations it cannot
        # render (e.g. a template that rejects a system message); that is a fault of this record.
        except Exception as e:  # noqa: BLE001
            yield BadRecord(file, int(line), f"prompt could not be rendered: {type(e).__name__}: {e}")
            continue
        if tokens > max_tokens:
            yield BadRecord(file, int(line), f"prompt is {tokens} tokens, longer than the maximum {max_tokens}")
        else:
            yield record
