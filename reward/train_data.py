"""The preference data of `reward train`: records read (bad ones reported), split into training and
held-out sets by whole record, rendered to text pairs and weighted by margin."""

from __future__ import annotations

import random
import sys
from collections.abc import Iterable, Sequence
from typing import TextIO

import msgspec

from contracts.errors import UserError
from contracts.formats import parse_prompt
from contracts.jsonl import BadRecord, report_bad
from contracts.rendering import PromptRenderer
from reward.preferences import PreferenceRecord, read_preferences


class PreferenceDataError(UserError, ValueError):
    """The preference data cannot be trained on: bad records with `stop`, or too little data."""


class TextPair(msgspec.Struct, frozen=True):
    """One comparison as the model sees it: two rendered samples and the loss weight."""

    chosen: str
    rejected: str
    weight: float


def load_records(
    files: Sequence[str], fmt: str, on_bad_record: str, *, log: TextIO | None = None
) -> tuple[list[PreferenceRecord], int]:
    """Every good record of `files`, and the number of bad ones (each printed as FILE:LINE: reason).

    With `stop`, any bad record raises PreferenceDataError after all of them are reported, so one pass
    shows everything to fix.
    """
    log = log or sys.stderr
    records: list[PreferenceRecord] = []
    bad: list[BadRecord] = []
    for file in files:
        for item in read_preferences(file, fmt):
            (bad if isinstance(item, BadRecord) else records).append(item)
    report_bad(
        bad,
        on_bad_record=on_bad_record,
        source=", ".join(files),
        what="bad preference record(s)",
        fix="fix them",
        error=PreferenceDataError,
        log=log,
    )
    if len(records) < 2:
        raise PreferenceDataError(
            f"{', '.join(files)}: {len(records)} valid preference record(s); training "
            "and a held-out set need at least 2"
        )
    return records, len(bad)


def split_records(
    records: Sequence[PreferenceRecord], fraction: float, seed: int
) -> tuple[list[PreferenceRecord], list[PreferenceRecord]]:
    """(training, held-out): a seeded shuffle of whole records, so a record's pairs stay together.

    At least one record lands on each side.
    """
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    count = min(max(1, round(fraction * len(records))), len(records) - 1)
    heldout = sorted(order[:count])
    chosen = set(heldout)
    return [r for i, r in enumerate(records) if i not in chosen], [records[i] for i in heldout]


def text_pairs(records: Iterable[PreferenceRecord], renderer: PromptRenderer) -> list[tuple[str, str, float | None]]:
    """(chosen text, rejected text, score margin or None) for each record's best-vs-rest pairs.

    A text is the prompt as the rollout job renders it (one user turn, chat template, generation
    prompt) followed by the response, which is what `RewardWorker` scores.
    """
    pairs = []
    for record in records:
        prompt = render_prompt(renderer, record.prompt, record.source)
        for chosen, rejected, margin in record.pairs():
            pairs.append((prompt + record.responses[chosen], prompt + record.responses[rejected], margin))
    return pairs


def render_prompt(renderer: PromptRenderer, prompt: str, source: str) -> str:
    """`prompt` as the rollout job renders an SFT prompt: one user turn, then the generation prompt."""
    return renderer.text(parse_prompt({"prompt": prompt}, "sft", source))


def weighted(pairs: Sequence[tuple[str, str, float | None]], margin_weighting: bool) -> list[TextPair]:
    """Loss weight 1 per pair, or with margin weighting the score margin over the mean margin."""
    margins = [m for _, _, m in pairs if m is not None]
    mean = sum(margins) / len(margins) if margins else 1.0
    return [
        TextPair(chosen, rejected, margin / mean if margin_weighting and margin is not None else 1.0)
        for chosen, rejected, margin in pairs
    ]
