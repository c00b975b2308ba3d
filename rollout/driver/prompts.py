"""Prompt data for a job: load and check the configured source, render, and sample batches.

`builtin:arith` generates `a+b=` problems with reference answers; anything else is a file in one
of the seed formats. Every bad record is reported as `FILE:LINE: reason`; the job then stops or
skips them as `data.on_bad_record` says.
"""

from __future__ import annotations

import random
import sys
from collections.abc import Iterator

import msgspec

from contracts.config import DataConfig
from contracts.errors import UserError
from contracts.formats import PromptRecord, parse_prompt, read_prompts
from contracts.jsonl import BadRecord, report_bad

BUILTIN_ARITH = "builtin:arith"


class PromptDataError(UserError, ValueError):
    """The prompt data has bad records and the config says to stop."""


def arith_problems(count: int, max_operand: int, seed: int) -> Iterator[dict]:
    """`a+b=` problems as SFT records; the same (count, max_operand, seed) gives the same list."""
    rng = random.Random(seed)
    for _ in range(count):
        a, b = rng.randint(0, max_operand), rng.randint(0, max_operand)
        yield {"prompt": f"{a}+{b}=", "completion": str(a + b)}


def load_prompts(cfg: DataConfig, seed: int, *, log=None) -> list[PromptRecord]:
    """All records of the configured source; bad ones reported (to stderr), then stop or skip per config."""
    log = log or sys.stderr
    if cfg.prompts == BUILTIN_ARITH:
        return unique_ids(
            [
                parse_prompt(obj, "sft", f"{BUILTIN_ARITH}:{i + 1}")
                for i, obj in enumerate(arith_problems(cfg.builtin_size, cfg.builtin_max_operand, seed))
            ]
        )
    records: list[PromptRecord] = []
    bad: list[BadRecord] = []
    for item in read_prompts(cfg.prompts, cfg.format):
        (bad if isinstance(item, BadRecord) else records).append(item)
    report_bad(
        bad,
        on_bad_record=cfg.on_bad_record,
        source=cfg.prompts,
        what="bad record(s)",
        fix="fix them",
        error=PromptDataError,
        log=log,
    )
    if not records:
        raise PromptDataError(f"{cfg.prompts}: no valid prompt records")
    return unique_ids(records)


def unique_ids(records: list[PromptRecord]) -> list[PromptRecord]:
    """Repeated identical records get `ID-2`, `ID-3`... in file order, so archive keys stay unique
    and ids stay stable for the same file."""
    seen: dict[str, int] = {}
    out = []
    for record in records:
        count = seen[record.prompt_id] = seen.get(record.prompt_id, 0) + 1
        out.append(record if count == 1 else msgspec.structs.replace(record, prompt_id=f"{record.prompt_id}-{count}"))
    return out


class PromptSampler(msgspec.Struct):
    """Batches of prompts in a seeded order, epoch after epoch; its state is the data cursor."""

    size: int
    seed: int
    shuffle: bool = True
    epoch: int = 0
    position: int = 0

    def next_batch(self, batch_size: int) -> list[int]:
        """`batch_size` distinct record indices. Across an epoch boundary, records the batch already
        holds are skipped in the new epoch: they were just seen at the end of the previous one."""
        if batch_size > self.size:
            raise ValueError(
                f"rollout.prompts_per_iteration ({batch_size}) exceeds the {self.size} prompt "
                "records: lower it or add data"
            )
        indices: list[int] = []
        while len(indices) < batch_size:
            order = self._order()
            taken = set(indices)
            while len(indices) < batch_size and self.position < self.size:
                index = order[self.position]
                self.position += 1
                if index not in taken:
                    indices.append(index)
            if self.position == self.size:
                self.epoch, self.position = self.epoch + 1, 0
        return indices

    def _order(self) -> list[int]:
        order = list(range(self.size))
        if self.shuffle:
            random.Random(self.seed * 7919 + self.epoch).shuffle(order)
        return order
