"""Prompt data for a job: load and check the configured source, render, and sample batches.

`builtin:arith` generates `a+b=` problems with reference answers; `builtin:calc` generates harder
ones (`a*b=`, `a-b=`, `a+b=` with operands up to `data.builtin_max_operand`) for the `calculator`
environment, each with a demonstration of the tool for the SFT warm-up; anything else is a file in one
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
BUILTIN_CALC = "builtin:calc"
CALC_OPERATORS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}


class PromptDataError(UserError, ValueError):
    """The prompt data has bad records and the config says to stop."""


def arith_problems(count: int, max_operand: int, seed: int) -> Iterator[dict]:
    """`a+b=` problems as SFT records; the same (count, max_operand, seed) gives the same list."""
    rng = random.Random(seed)
    for _ in range(count):
        a, b = rng.randint(0, max_operand), rng.randint(0, max_operand)
        yield {"prompt": f"{a}+{b}=", "completion": str(a + b)}


def calc_problems(count: int, max_operand: int, seed: int) -> Iterator[tuple[str, int, int, int]]:
    """(operator, a, b, answer) of `a+b=`, `a-b=` and `a*b=` problems, operands in [0, max_operand];
    the same (count, max_operand, seed) gives the same list."""
    rng = random.Random(seed)
    operators = list(CALC_OPERATORS)
    for _ in range(count):
        op, a, b = rng.choice(operators), rng.randint(0, max_operand), rng.randint(0, max_operand)
        yield op, a, b, CALC_OPERATORS[op](a, b)


def calc_records(count: int, max_operand: int, seed: int, observation_role: str = "user") -> list[PromptRecord]:
    """`builtin:calc` records: the prompt `a*b=`, the answer as reference, and in
    `metadata["demonstration"]` the episode that uses the calculator well, as chat messages: the call
    `<calc>a*b</calc>`, its `<result>` (as `observation_role`, the role observations are rendered as)
    and the answer. The prompt id is the problem's alone, whatever the role, so a run's archive finds
    its records again."""
    records = []
    for i, (op, a, b, answer) in enumerate(calc_problems(count, max_operand, seed)):
        record = parse_prompt({"prompt": f"{a}{op}{b}=", "completion": str(answer)}, "sft", f"{BUILTIN_CALC}:{i + 1}")
        demonstration = [
            {"role": "assistant", "content": f"<calc>{a}{op}{b}</calc>"},
            {"role": observation_role, "content": f"<result>{answer}</result>"},
            {"role": "assistant", "content": str(answer)},
        ]
        records.append(msgspec.structs.replace(record, metadata={"demonstration": demonstration}))
    return unique_ids(records)


def load_prompts(cfg: DataConfig, seed: int, *, log=None, observation_role: str = "user") -> list[PromptRecord]:
    """All records of the configured source; bad ones reported (to stderr), then stop or skip per config.
    `observation_role` is the role of the environment's turns in `builtin:calc` demonstrations."""
    log = log or sys.stderr
    if cfg.prompts == BUILTIN_ARITH:
        return unique_ids(
            [
                parse_prompt(obj, "sft", f"{BUILTIN_ARITH}:{i + 1}")
                for i, obj in enumerate(arith_problems(cfg.builtin_size, cfg.builtin_max_operand, seed))
            ]
        )
    if cfg.prompts == BUILTIN_CALC:
        return calc_records(cfg.builtin_size, cfg.builtin_max_operand, seed, observation_role)
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

    def next_batch(self, batch_size: int, exclude: frozenset[int] = frozenset()) -> list[int]:
        """`batch_size` distinct record indices, none of `exclude` (an iteration's earlier rounds). Across an
        epoch boundary, records the batch already holds are skipped in the new epoch: they were just seen at
        the end of the previous one."""
        if batch_size + len(exclude) > self.size:
            raise ValueError(
                f"rollout.prompts_per_iteration ({batch_size}) exceeds the {self.size - len(exclude)} prompt "
                "records left: lower it or add data"
            )
        indices: list[int] = []
        while len(indices) < batch_size:
            order = self._order()
            taken = set(indices) | exclude
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
