"""Prompt data for a job: load and check the configured source, render, and sample batches.

`builtin:arith` generates `a+b=` problems with reference answers; `builtin:calc` generates harder
ones (`a*b=`, `a-b=`, `a+b=` with operands up to `data.builtin_max_operand`) for the `calculator`
environment, each with a demonstration of the tool for the SFT warm-up; anything else is read by its data
source (`contracts.data_sources`). Every bad record is reported as `SOURCE:N: reason`; the job then stops
or skips them as `data.on_bad_record` says.

`Prompts` holds them in data order. A row source (JSON, generated records) is read and rendered whole at
load, as it is small enough to hold as Python objects; a columnar source (Parquet, Arrow, `datasets`, `hf:`)
stays one Arrow table, and a row becomes a record and a rendered prompt only when a batch draws it, so a
table of millions of rows is ready in seconds. A table of up to `CHECK_ROWS` rows is still checked whole at
load; in a larger one a bad row is found when drawn, then reported and stopped on, or skipped and another
drawn in its place.
"""

from __future__ import annotations

import functools
import random
import sys
from array import array
from collections import OrderedDict
from collections.abc import Callable, Iterator

import msgspec

from contracts.config import DataConfig
from contracts.data_sources import DATA_SOURCES, data_source, is_columnar, read_table
from contracts.errors import UserError
from contracts.formats import (
    Columns,
    FormatError,
    Message,
    PromptRecord,
    parse_prompt,
    prompt_record,
    read_prompts,
)
from contracts.jsonl import BadRecord, report_bad
from contracts.rendering import PromptRenderer, PromptTask, render_prompts

CHECK_ROWS = 50_000  # a table this small is read and rendered whole at load, so bad rows fail before Ray
CACHED_ROWS = 100_000  # rows of a large table kept read and rendered, the most recently drawn

BUILTIN_ARITH = "builtin:arith"
BUILTIN_CALC = "builtin:calc"
# `builtin:calc` for an agent with a `calc(x)` function tool (`configs/tiny-agent.yaml`): the tool listed
# in a system message as the built-in template lists `tools`, the call as Hermes JSON, its result a tool turn.
BUILTIN_CALC_TOOLS = "builtin:calc-tools"
CALC_TOOLS_LINE = "tools: calc(x)"
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


def calc_records(
    count: int, max_operand: int, seed: int, observation_role: str = "user", *, tools: bool = False
) -> list[PromptRecord]:
    """`builtin:calc` records: the prompt `a*b=`, the answer as reference, and in
    `metadata["demonstration"]` the episode that uses the calculator well, as chat messages: the call
    `<calc>a*b</calc>`, its `<result>` (as `observation_role`, the role observations are rendered as)
    and the answer. The prompt id is the problem's alone, whatever the role, so a run's archive finds
    its records again."""
    records = []
    for i, (op, a, b, answer) in enumerate(calc_problems(count, max_operand, seed)):
        if tools:
            system = {"role": "system", "content": CALC_TOOLS_LINE}
            obj = {"messages": [system, {"role": "user", "content": f"{a}{op}{b}="}], "completion": str(answer)}
            record = parse_prompt(obj, "chat", f"{BUILTIN_CALC_TOOLS}:{i + 1}")
            call = f'<tool_call>{{"name": "calc", "arguments": {{"x": "{a}{op}{b}"}}}}</tool_call>'
            demonstration = [
                {"role": "assistant", "content": call},
                {"role": "tool", "content": str(answer)},
                {"role": "assistant", "content": str(answer)},
            ]
            records.append(
                msgspec.structs.replace(record, reference=str(answer), metadata={"demonstration": demonstration})
            )
            continue
        record = parse_prompt({"prompt": f"{a}{op}{b}=", "completion": str(answer)}, "sft", f"{BUILTIN_CALC}:{i + 1}")
        demonstration = [
            {"role": "assistant", "content": f"<calc>{a}{op}{b}</calc>"},
            {"role": observation_role, "content": f"<result>{answer}</result>"},
            {"role": "assistant", "content": str(answer)},
        ]
        records.append(msgspec.structs.replace(record, metadata={"demonstration": demonstration}))
    return unique_ids(records)


def load_prompts(cfg: DataConfig, seed: int, *, log=None, observation_role: str = "user") -> list[PromptRecord]:
    """All records of the configured source, as a list; bad ones reported (to stderr), then stop or skip per
    config. `observation_role` is the role of the environment's turns in `builtin:calc` demonstrations."""
    log = log or sys.stderr
    if cfg.prompts == BUILTIN_ARITH:
        return unique_ids(
            [
                parse_prompt(obj, "sft", f"{BUILTIN_ARITH}:{i + 1}")
                for i, obj in enumerate(arith_problems(cfg.builtin_size, cfg.builtin_max_operand, seed))
            ]
        )
    if cfg.prompts in (BUILTIN_CALC, BUILTIN_CALC_TOOLS):
        tools = cfg.prompts == BUILTIN_CALC_TOOLS
        return calc_records(cfg.builtin_size, cfg.builtin_max_operand, seed, observation_role, tools=tools)
    records: list[PromptRecord] = []
    bad: list[BadRecord] = []
    for item in read_prompts(cfg.prompts, cfg.format, cfg.source_params, columns(cfg)):
        (bad if isinstance(item, BadRecord) else records).append(item)
    report_bad_records(bad, cfg.on_bad_record, cfg.prompts, log)
    if not records:
        raise PromptDataError(f"{cfg.prompts}: no valid prompt records")
    return unique_ids(records)


def report_bad_records(bad: list, on_bad_record: str, source: str, log, *, listed: int | None = None) -> None:
    """The bad prompt records found at load, reported; PromptDataError once all are listed, unless skipped."""
    report_bad(
        bad,
        on_bad_record=on_bad_record,
        source=source,
        what="bad record(s)",
        fix="fix them",
        error=PromptDataError,
        log=log,
        listed=listed,
    )


def columns(cfg: DataConfig) -> Columns | None:
    """The layout `data.prompt_key` names, or None to detect each record's."""
    if cfg.prompt_key is None:
        return None
    keys = None if cfg.metadata_keys is None else tuple(cfg.metadata_keys)
    return Columns(cfg.prompt_key, cfg.reference_key, keys)


def job_prompts(
    cfg: DataConfig,
    seed: int,
    renderer: PromptRenderer,
    *,
    log,
    opening: Callable[[PromptRecord], list[Message]] | None = None,
    observation_role: str = "user",
) -> Prompts:
    """The job's prompts, checked as far as their size allows before anything starts: a row source read and
    rendered whole, a table's columns checked against its layout and, up to `CHECK_ROWS` rows, every row."""
    if cfg.prompts.startswith("builtin:") or not is_columnar(cfg.prompts):
        records, tasks = render_prompts(
            load_prompts(cfg, seed, log=log, observation_role=observation_role),
            renderer,
            on_bad_record=cfg.on_bad_record,
            source=cfg.prompts,
            log=log,
            opening=opening,
        )
        return Prompts(cfg.prompts, len(records), records.__getitem__, renderer, opening=opening, log=log).filled(
            records, tasks
        )
    table = read_table(cfg.prompts, cfg.source_params)
    layout = columns(cfg)
    check_layout(cfg.prompts, table.column_names, layout, cfg.format)
    if table.num_rows == 0:
        raise PromptDataError(f"{cfg.prompts}: no rows")
    rows = TableRows(table)
    prompts = Prompts(
        cfg.prompts,
        table.num_rows,
        lambda row: prompt_record(rows[row], cfg.format, layout, f"{cfg.prompts}:{row}", row=row),
        renderer,
        opening=opening,
        on_bad_record=cfg.on_bad_record,
        log=log,
        cached=None if table.num_rows <= CHECK_ROWS else CACHED_ROWS,
    )
    if table.num_rows <= CHECK_ROWS:
        prompts.check_all()
    return prompts


def check_source(cfg: DataConfig) -> None:
    """What of `data.prompts` can be checked in a moment, before Ray starts: the source can read the spec
    (the file is there and is what its name says, a task is known, its params right), and a table's columns
    fit a layout. PromptDataError or DataSourceError in one line; the rows are read later."""
    if cfg.prompts.startswith("builtin:"):
        return
    entry = DATA_SOURCES.entry(data_source(cfg.prompts))
    quick_check = entry.attributes.get("check")
    if quick_check is not None:
        quick_check(cfg.prompts, cfg.source_params)
    column_names = entry.attributes.get("columns")
    if column_names is not None:
        check_layout(cfg.prompts, column_names(cfg.prompts, cfg.source_params), columns(cfg), cfg.format)


def check_layout(source: str, names: list[str], layout: Columns | None, fmt: str) -> None:
    """PromptDataError, in one line, when a table's columns fit neither a known layout nor `data.prompt_key`."""
    if layout is not None:
        for key, field in ((layout.prompt, "data.prompt_key"), (layout.reference, "data.reference_key")):
            if key is not None and key.split(".")[0] not in names:
                raise PromptDataError(f"{source}: {field} {key!r} is not a column; its columns: {', '.join(names)}")
        missing = [k for k in layout.metadata or () if k not in names]
        if missing:
            raise PromptDataError(
                f"{source}: data.metadata_keys {missing} are not columns; its columns: {', '.join(names)}"
            )
        return
    if fmt == "auto" and not {"prompt", "conversation", "messages"} & set(names):
        raise PromptDataError(
            f"{source}: no prompt / conversation / messages column; set data.prompt_key to the column holding "
            f"the prompt (its columns: {', '.join(names)})"
        )


class TableRows:
    """A table's rows as dicts by index, converted a slice at a time."""

    def __init__(self, table):
        self.table = table

    def __getitem__(self, row: int) -> dict:
        return self.table.slice(row, 1).to_pylist()[0]


class Prompts:
    """The job's prompt records in data order, each rendered for generation once and kept while drawn.

    `read_row(i)` gives record `i` (FormatError for a bad one); `opening` the messages an episode opens with.
    `cached`: how many rows stay read and rendered (the most recently drawn), None for all."""

    def __init__(
        self,
        source: str,
        size: int,
        read_row: Callable[[int], PromptRecord],
        renderer: PromptRenderer,
        *,
        opening: Callable[[PromptRecord], list[Message]] | None = None,
        on_bad_record: str = "stop",
        log=None,
        cached: int | None = None,
    ):
        self.source = source
        self.size = size
        self._read_row = read_row
        self._renderer = renderer
        self._opening = opening
        self._on_bad_record = on_bad_record
        self._log = log or sys.stderr
        self._cached = cached
        self._rows: OrderedDict[int, tuple[PromptRecord, PromptTask]] = OrderedDict()
        self._by_id: dict[str, int] = {}
        self.bad: set[int] = set()

    def __len__(self) -> int:
        return self.size

    def filled(self, records: list[PromptRecord], tasks: dict[str, PromptTask]) -> Prompts:
        """These prompts with every record already read and rendered (`tasks` by prompt id)."""
        for row, record in enumerate(records):
            self._keep(row, record, tasks[record.prompt_id])
        return self

    def check_all(self) -> None:
        """Every row read and rendered now, the bad ones reported together: stop, or skip them when drawn."""
        bad = []
        for row in range(self.size):
            try:
                self._entry(row)
            except FormatError as e:
                bad.append(str(e))
                self.bad.add(row)
        report_bad_records(bad, self._on_bad_record, self.source, self._log, listed=20)
        if len(self.bad) == self.size:
            raise PromptDataError(f"{self.source}: no valid prompt records")

    def draw(self, sampler: PromptSampler, size: int, exclude: frozenset[int] = frozenset()) -> list[int]:
        """`size` rows from `sampler`, none of `exclude`, each read and rendered; a bad row is reported, then
        stops the job or is left out and another drawn in its place, as `data.on_bad_record` says."""
        picked: list[int] = []
        while len(picked) < size:
            for row in sampler.next_batch(size - len(picked), exclude | frozenset(picked) | frozenset(self.bad)):
                if self._usable(row):
                    picked.append(row)
        return picked

    def usable(self) -> list[int]:
        """Every row that reads and renders, in order (`rollout generate` takes them all)."""
        return [row for row in range(self.size) if self._usable(row)]

    def task(self, row: int) -> PromptTask:
        return self._entry(row)[1]

    def record(self, row: int) -> PromptRecord:
        return self._entry(row)[0]

    def by_id(self, prompt_id: str) -> PromptRecord:
        """The record of a drawn prompt, by its id."""
        return self.record(self._by_id[prompt_id])

    def rows_of(self, prompt_ids) -> frozenset[int]:
        """The rows of drawn prompts, by their ids."""
        return frozenset(self._by_id[i] for i in prompt_ids)

    def records(self) -> list[PromptRecord]:
        """Every good record in order (the SFT warm-up reads them all)."""
        return [self.record(row) for row in self.usable()]

    def _usable(self, row: int) -> bool:
        if row in self.bad:
            return False
        try:
            self._entry(row)
            return True
        except FormatError as e:
            self.bad.add(row)
            print(e, file=self._log)
            if self._on_bad_record == "stop":
                raise PromptDataError(
                    f"{self.source}: a bad record, above; fix it, or set data.on_bad_record=skip to train on the rest"
                ) from None
            if len(self.bad) == self.size:
                raise PromptDataError(f"{self.source}: no valid prompt records") from None
            return False

    def _entry(self, row: int) -> tuple[PromptRecord, PromptTask]:
        entry = self._rows.get(row)
        if entry is not None:
            self._rows.move_to_end(row)
            return entry
        if not 0 <= row < self.size:
            raise IndexError(f"row {row} of {self.size}")
        try:
            record = self._read_row(row)
        except FormatError as e:
            raise FormatError(f"{self.source}:{row}: {e}") from None
        task = self._renderer.render(record, None if self._opening is None else self._opening(record))
        self._keep(row, record, task)
        return record, task

    def _keep(self, row: int, record: PromptRecord, task: PromptTask) -> None:
        self._rows[row] = (record, task)
        self._by_id[record.prompt_id] = row
        if self._cached is not None and len(self._rows) > self._cached:
            old_row, (old, _) = self._rows.popitem(last=False)
            self._by_id.pop(old.prompt_id, None)


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

    def _order(self) -> array:
        return _epoch_order(self.size, self.seed, self.epoch, self.shuffle)


@functools.lru_cache(maxsize=2)
def _epoch_order(size: int, seed: int, epoch: int, shuffle: bool) -> array:
    """An epoch's order of record indices, built once per epoch rather than per batch (a million rows take
    a second to shuffle), and kept as machine integers: a list of a million ints holds 36 MB."""
    order = list(range(size))
    if shuffle:
        random.Random(seed * 7919 + epoch).shuffle(order)
    return array("q", order)
