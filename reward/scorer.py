"""Scoring completions: weighted rule functions with a per-call timeout, and a reward model.

`RuleScorer` runs the configured rules (`reward.rules`: built-ins, or a user's
`package.module:function`, loaded once when the scorer is built) on each sample and keeps every
component: a rule that raises, runs past the timeout or returns anything but a finite number
marks its component failed (NaN in `components`, its name in `failed`) and the rest of the sample
is still scored. `RewardModelScorer` scores rendered prompt + response texts with a sequence
classifier trained by `reward train`. Both are plain classes; the `RewardWorker` actor wraps them
for Ray.
"""

from __future__ import annotations

import inspect
import logging
import math
import numbers
import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from functools import partial
from pathlib import Path
from typing import Any

import msgspec

from contracts.config import RuleSpec
from contracts.errors import JobFailure
from contracts.registry import Registry
from reward.rule_params import check_params
from reward.rules import RESPONSE_TOKENS, RULES, Rule
from reward.user_rules import component_name

log = logging.getLogger(__name__)


class RewardResult(msgspec.Struct):
    """One sample's reward: the weighted total and each component before weighting."""

    total: float
    components: dict[str, float]  # NaN where the component failed
    failed: list[str]  # names of components that raised or timed out


class ScorerStuckError(JobFailure):
    """Too many timed-out rule calls are still running; scoring more would pile up threads."""


class _Component(msgspec.Struct, frozen=True):
    name: str
    weight: float
    call: Callable[..., float]
    counts_tokens: bool  # the rule declares `response_tokens`


class _DaemonPool:
    """Threads that run rule calls. They are daemon threads: a call abandoned past its time limit must not
    hold up the process's exit, where a ThreadPoolExecutor joins every thread it started, stuck ones too."""

    def __init__(self, workers: int):
        self._workers = workers
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        for i in range(workers):
            threading.Thread(target=self._work, daemon=True, name=f"reward-rule-{i}").start()

    def submit(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Future:
        future: Future = Future()
        self._queue.put((future, fn, args, kwargs))
        return future

    def shutdown(self) -> None:
        """Idle threads end; one still in a call ends with it, or with the process."""
        for _ in range(self._workers):
            self._queue.put(None)

    def _work(self) -> None:
        while (item := self._queue.get()) is not None:
            future, fn, args, kwargs = item
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn(*args, **kwargs))
            except BaseException as e:  # noqa: BLE001 - the caller reads it from the future
                future.set_exception(e)


class RuleScorer:
    """Weighted rule functions over (prompt, response, record) samples.

    total = sum(weight * value) over components that succeeded, plus `failed_value` (unweighted)
    for each that failed. A rule listed twice is named `name`, then `name#1`, `name#2`, ...

    Timeouts: each rule call runs on a worker thread and the scorer waits `timeout_s` for it. A
    thread cannot be killed, so a call that times out is abandoned: it runs on until it returns,
    and its result is thrown away. The pool holds `max_abandoned + 1` threads, so one is always
    free while fewer than `max_abandoned` abandoned calls are still running; at that bound
    `score` raises ScorerStuckError instead of queueing work behind them. The timeout can only
    fire while the rule lets go of the GIL (Python code, sleeps, I/O, the `regex` package with
    `concurrent=True`); a C call that holds the GIL, such as a stdlib `re` match, blocks the
    scorer until it returns, which is why the built-in regex rules use `regex` with a time limit.

    Calls from several threads are serialised by a lock: the latency and failure counters and
    the bound on abandoned threads hold per scorer.
    """

    def __init__(
        self,
        rules: Sequence[RuleSpec],
        *,
        timeout_s: float,
        failed_value: float = 0.0,
        max_abandoned: int = 8,
        registry: Registry[Rule] = RULES,
    ):
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be positive, got {timeout_s}")
        if max_abandoned < 1:
            raise ValueError(f"max_abandoned must be >= 1, got {max_abandoned}")
        self.components = _bind(rules, registry)
        self.timeout_s = timeout_s
        self.failed_value = failed_value
        self.max_abandoned = max_abandoned
        self.latency: dict[str, float] = {c.name: 0.0 for c in self.components}  # cumulative seconds
        self.failures: dict[str, int] = {c.name: 0 for c in self.components}
        self.counts_tokens = any(c.counts_tokens for c in self.components)  # score_batch wants token counts
        self._pool = _DaemonPool(max_abandoned + 1)
        self._abandoned: list[Future] = []
        self._lock = threading.Lock()

    def score(self, prompt: str, response: str, record: Any, response_tokens: int | None = None) -> RewardResult:
        """Every component of one sample, and their weighted total. `response_tokens` (the response's
        length in tokens) goes to the rules that declare it."""
        with self._lock:
            components: dict[str, float] = {}
            failed: list[str] = []
            total = 0.0
            for component in self.components:
                value = self._run(component, prompt, response, record, response_tokens)
                components[component.name] = value
                if math.isnan(value):
                    failed.append(component.name)
                    total += self.failed_value
                else:
                    total += component.weight * value
            return RewardResult(total=total, components=components, failed=failed)

    def score_batch(
        self, items: Sequence[tuple[str, str, Any]], response_tokens: Sequence[int] | None = None
    ) -> list[RewardResult]:
        """`score` for each (prompt, response, record), in order, with its response's token count."""
        counts = response_tokens if response_tokens is not None else [None] * len(items)
        return [self.score(prompt, response, record, n) for (prompt, response, record), n in zip(items, counts)]

    def close(self) -> None:
        """Stop taking work; abandoned calls are not waited for."""
        self._pool.shutdown()

    def _run(
        self, component: _Component, prompt: str, response: str, record: Any, response_tokens: int | None
    ) -> float:
        """The component's value, or NaN when it raised, timed out or returned a non-number."""
        self._check_abandoned()
        started = time.perf_counter()
        counted = {RESPONSE_TOKENS: response_tokens} if component.counts_tokens else {}
        future = self._pool.submit(component.call, prompt, response, record, **counted)
        try:
            value = future.result(timeout=self.timeout_s)
            if not _is_number(value):
                raise TypeError(f"returned {value!r}, not a finite number")
            return float(value)
        except FutureTimeout:
            self._abandoned.append(future)
            self._record_failure(component.name, f"timed out after {self.timeout_s}s (thread abandoned)")
        except Exception as e:  # noqa: BLE001 - any error in a rule marks only that component failed
            self._record_failure(component.name, f"{type(e).__name__}: {e}")
        finally:
            self.latency[component.name] += time.perf_counter() - started
        return math.nan

    def _check_abandoned(self) -> None:
        self._abandoned = [f for f in self._abandoned if not f.done()]
        if len(self._abandoned) >= self.max_abandoned:
            raise ScorerStuckError(
                f"{len(self._abandoned)} rule calls ran past the {self.timeout_s}s timeout and are still "
                "running; fix the slow rule or pattern, or raise reward.timeout_s"
            )

    def _record_failure(self, name: str, reason: str) -> None:
        self.failures[name] += 1
        # The first failure of a component is worth a warning; every one after it would flood the log.
        if self.failures[name] == 1:
            log.warning("reward component %s failed: %s", name, reason)
        else:
            log.debug("reward component %s failed: %s", name, reason)


def _bind(rules: Sequence[RuleSpec], registry: Registry[Rule]) -> list[_Component]:
    """Each spec as a named component with its params bound; ValueError for a bad name or param."""
    components = []
    for i, (spec, name) in enumerate(zip(rules, rule_component_names(rules))):
        entry = registry.entry(spec.name, field=f"reward.rules.{i}.name")
        rule = entry.value
        check_params(spec.name, rule, spec.params)
        prepare = entry.attributes.get("prepare")
        if prepare is not None:  # a rule's own set-up (the `math` rule's verifier), done before any sample's timeout
            prepare()
        counts_tokens = RESPONSE_TOKENS in inspect.signature(rule).parameters
        components.append(
            _Component(name=name, weight=spec.weight, call=partial(rule, **spec.params), counts_tokens=counts_tokens)
        )
    return components


def rule_component_names(rules: Sequence[RuleSpec]) -> list[str]:
    """The component each rule scores into: its name (a user rule's function name, the part after
    the colon), then `name#1`, `name#2`, ... where the name repeats."""
    names, seen = [], {}
    for spec in rules:
        base = component_name(spec.name)
        count = seen.get(base, 0)
        seen[base] = count + 1
        names.append(base if count == 0 else f"{base}#{count}")
    return names


def _is_number(value: Any) -> bool:
    # numbers.Real, not (int, float): a user's verifier may well return a numpy float32.
    return isinstance(value, numbers.Real) and math.isfinite(value)


class RewardModelScorer:
    """A scalar reward model: a sequence classifier with one label, saved by `save_pretrained`.

    Texts are whole rendered samples (chat-templated prompt + response, special tokens included),
    so the tokenizer adds none by default. Batches are padded on the right with the tokenizer's
    pad token and the score is read at the last non-pad token; texts longer than `max_length`
    lose their beginning, not the response at their end.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        batch_size: int = 32,
        device: str = "auto",
        dtype: str | None = None,
        max_length: int | None = None,
        add_special_tokens: bool = False,
    ):
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size = batch_size
        self.add_special_tokens = add_special_tokens
        self.device = torch.device(_resolve_device(device))
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.tokenizer.padding_side = "right"
        self.tokenizer.truncation_side = "left"
        if self.tokenizer.pad_token is None:
            raise ValueError(f"{path}: the reward model's tokenizer has no pad token; set one and save it again")
        self.model = AutoModelForSequenceClassification.from_pretrained(
            path, dtype=getattr(torch, dtype) if dtype else "auto"
        )
        # Tokenizers without a limit report a huge model_max_length; the positions the model has bound it.
        self.max_length = max_length or min(
            self.tokenizer.model_max_length, getattr(self.model.config, "max_position_embeddings", math.inf)
        )
        if self.model.config.num_labels != 1:
            raise ValueError(
                f"{path}: a reward model has one output label, this one has {self.model.config.num_labels}"
            )
        # The classifier finds each row's last real token by comparing ids with its pad id.
        self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.model.to(self.device).eval()
        self.batches_done = 0  # forwards so far: a caller watching for a stall sees it advance

    def score(self, texts: Sequence[str]) -> list[float]:
        """One score per text, in order."""
        import torch

        # Batching texts of similar length wastes less compute on padding; scores are put back in order.
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        scores = [0.0] * len(texts)
        with torch.inference_mode():
            for start in range(0, len(order), self.batch_size):
                chunk = order[start : start + self.batch_size]
                for index, value in zip(chunk, self._forward([texts[i] for i in chunk])):
                    scores[index] = value
                self.batches_done += 1
        return scores

    def _forward(self, texts: list[str]) -> list[float]:
        batch = self.tokenizer(
            texts,
            padding=True,
            truncation=True,
            max_length=self.max_length,
            add_special_tokens=self.add_special_tokens,
            return_tensors="pt",
        )
        if batch["input_ids"].shape[1] == 0 or not bool(batch["attention_mask"].sum(dim=1).all()):
            raise ValueError("a text has no tokens: there is nothing to score it by")
        batch = {key: value.to(self.device) for key, value in batch.items() if key in ("input_ids", "attention_mask")}
        return self.model(**batch).logits[:, 0].float().tolist()


def _resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device
