"""`rollout stats`: per-iteration figures of a run, computed from its archive alone.

Per iteration: samples, generated tokens, generation tokens/s, reward mean/std and each component's
mean (a NaN component is a failed rule: left out of the mean and counted), KL, response length,
finish reasons, policy-version lag and spread, the samples trained on, an episode's model and environment
turns and environment errors; from the run's metrics, actor restarts, clip fractions (each side) and
dynamic sampling's filtered groups and rounds; plus the same over the whole archive. Everything is column
arithmetic on the few columns it needs (pyarrow group_by, numpy over list offsets), never a Python
loop over rows, so a million-row archive takes seconds.

Tokens/s needs more than the rows: the per-sample `generated_at` stamps only bound when results
came back, not when generation started, so `tokens_per_s` from the run's `metrics.jsonl` (next to
`rollouts/`, or the source run's for a replayed archive) is used where it exists; otherwise tokens /
(last − first `generated_at`) of the iteration. KL is the mean over samples of Σ_t kl_t, the
learner's per-token KL (`kl` column; null in `rollout generate` archives, and in v1 archives where
the run's coefficient is unknown or 0, which leaves the iteration's KL null).

Versions: with partial rollouts a sample can be cut by a weight load and resumed under newer weights, so
an iteration's rows span versions. `version_min`/`version_max` are the oldest and newest first-token
version (`policy_version`, the one staleness is judged by), `version_last_max` the newest last-token
version (`policy_version_last`), `resumed` the rows resumed at least once and `multi_version` the rows
whose last token's version is newer than their first's; `version_spread` is
version_last_max − version_min, what the run's `partial/version_spread` reports. Over the whole archive
the spread is the widest of one iteration's.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from contracts.schema import FINISH_REASONS
from rollout.archive import read_run_metrics, read_table, run_dir_of
from rollout.driver.eval_metrics import EVAL_FILE

STATS_COLUMNS = [
    "iteration",
    "policy_version",
    "policy_version_last",
    "resumed_versions",
    "response_ids",
    "reward",
    "reward_components",
    "kl",
    "finish_reason",
    "generated_at",
    "response_mask",
    "num_turns",
    "env_error",
    "trained",
]
# Figures of the learner and of dynamic sampling that only the run's metrics hold.
METRIC_FIGURES = (
    "clip_frac",
    "clip_frac_high",
    "clip_frac_low",
    "clipped_sequences",
    "mismatch/kl",
    "dynamic_sampling/filtered_groups",
    "dynamic_sampling/rounds",
)


# --- per-iteration figures -----------------------------------------------------------------------


@dataclass
class RunStats:
    archive: str
    iterations: list[dict[str, Any]]
    totals: dict[str, Any]
    evaluations: list[dict[str, Any]] = dataclasses.field(default_factory=list)  # RUN/eval/metrics.jsonl, in order

    def to_json(self, last: int | None = None, every: int | None = None) -> dict[str, Any]:
        """Plain JSON: NaN and inf become null; the iterations `shown` picks; every held-out evaluation."""
        shown = {
            "archive": self.archive,
            "iterations": [_finite(d) for d in self.shown(last, every)],
            "totals": _finite(self.totals),
        }
        if self.evaluations:
            shown["evaluations"] = [_finite(d) for d in self.evaluations]
        return shown

    def shown(self, last: int | None = None, every: int | None = None) -> list[dict[str, Any]]:
        """The iterations a long table keeps: the `last` N, and of those every K-th (and the final one)."""
        items = self.iterations[-last:] if last else self.iterations
        if every and every > 1:
            items = [item for k, item in enumerate(items) if k % every == 0 or k == len(items) - 1]
        return items


def compute_stats(archive: str | Path) -> RunStats:
    table = read_table(archive, STATS_COLUMNS)
    run_metrics = read_run_metrics(archive)
    rows = _row_table(table)
    per_iteration = _aggregate_iterations(rows)
    finish = _finish_counts(rows)
    components = _component_table(table)
    by_iteration_components = _component_means(components, ["iteration", "key"])

    stats = []
    for row in per_iteration.to_pylist():
        i = row["iteration"]
        item = {
            "iteration": i,
            "samples": row["samples"],
            "tokens": row["tokens"],
            "tokens_per_s": _tokens_per_s(row, run_metrics.get(i)),
            "reward_mean": row["reward_mean"],
            "reward_std": row["reward_std"],
        }
        item.update(by_iteration_components.get(i, {}))
        item["kl"] = None if row["missing_kl"] else row["kl_sum"] / row["samples"]
        item["response_length_mean"] = row["length_mean"]
        item.update({f"finish/{reason}": finish.get((i, reason), 0) for reason in _reasons(finish)})
        item["version_lag"] = row["version_max"] - row["version_mean"]
        item.update(
            version_min=row["version_min"],
            version_max=row["version_max"],
            version_last_max=row["version_last_max"],
            version_spread=row["version_last_max"] - row["version_min"],
            resumed=row["resumed"],
            multi_version=row["multi_version"],
        )
        item["restarts"] = _restarts(run_metrics.get(i))
        item.update(trained=row["trained"], turns_mean=row["turns_mean"], env_turns_mean=row["env_turns_mean"])
        item["env_errors"] = row["env_errors"]
        item.update({key: (run_metrics.get(i) or {}).get(key) for key in METRIC_FIGURES})
        item.update({k: v for k, v in (run_metrics.get(i) or {}).items() if k.startswith("distill/")})  # a teacher's
        stats.append(item)
    return RunStats(str(archive), stats, _totals(rows, stats, components, finish), read_evaluations(archive))


def read_evaluations(archive: str | Path) -> list[dict[str, Any]]:
    """The run's held-out evaluations, one dict each (`eval/...` figures, `eval/iteration`: after which
    iteration, -1 at the start), from RUN/eval/metrics.jsonl; [] when it has none."""
    try:
        path = run_dir_of(archive) / "eval" / EVAL_FILE
    except FileNotFoundError:
        return []
    if not path.is_file():
        return []
    found = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            found.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut by a crash mid-write
            continue
    return found


def _row_table(table: pa.Table) -> pa.Table:
    """One row per sample of the scalars the figures need; the sequence KL Σ_t kl_t included."""
    lengths = pc.list_value_length(table["response_ids"]).cast(pa.int64())
    return pa.table(
        {
            "iteration": table["iteration"],
            "policy_version": table["policy_version"],
            "policy_version_last": table["policy_version_last"],
            "resumed": pc.greater(pc.list_value_length(table["resumed_versions"]), 0).cast(pa.int64()),
            "multi_version": pc.greater(table["policy_version_last"], table["policy_version"]).cast(pa.int64()),
            "length": lengths,
            "reward": table["reward"].cast(pa.float64()),
            "kl": _row_sums(table["kl"]),
            "finish_reason": table["finish_reason"],
            "generated_at": table["generated_at"],
            "turns": table["num_turns"],
            "env_turns": _environment_turns(table["response_mask"]),
            "env_error": table["env_error"].is_valid().cast(pa.int64()),
            "trained": table["trained"].cast(pa.int64()),
        }
    )


def _environment_turns(column: pa.ChunkedArray) -> pa.ChunkedArray:
    """Each row's environment turns: the runs of 0 in its `response_mask`. (N,) lists -> (N,) int64."""
    counts = []
    for chunk in column.chunks:
        offsets = np.asarray(chunk.offsets)
        values = chunk.values.to_numpy(zero_copy_only=False)
        starts = values == 0
        starts[1:] &= values[:-1] != 0  # a 0 after a 0 continues its turn...
        row_start = offsets[:-1][offsets[:-1] < offsets[1:]]
        starts[row_start] = values[row_start] == 0  # ...but not across rows
        running = np.concatenate([[0], np.cumsum(starts)])
        counts.append(pa.array(running[offsets[1:]] - running[offsets[:-1]], pa.int64()))
    return pa.chunked_array(counts, type=pa.int64())


def _row_sums(column: pa.ChunkedArray) -> pa.ChunkedArray:
    """Σ of each row's float list, in float64; null where the list is null. (N,) lists -> (N,)."""
    sums = []
    for chunk in column.chunks:
        offsets = np.asarray(chunk.offsets)  # absolute positions in chunk.values, slices included
        values = chunk.values.to_numpy(zero_copy_only=False).astype(np.float64)
        running = np.concatenate([[0.0], np.cumsum(values)])
        sums.append(
            pa.array(running[offsets[1:]] - running[offsets[:-1]], mask=chunk.is_null().to_numpy(zero_copy_only=False))
        )
    return pa.chunked_array(sums, type=pa.float64())


_NULLS = pc.CountOptions(mode="only_null")


def _aggregate_iterations(rows: pa.Table) -> pa.Table:
    aggregated = (
        rows.group_by("iteration")
        .aggregate(
            [
                ("length", "count"),
                ("length", "sum"),
                ("length", "mean"),
                ("reward", "mean"),
                ("reward", "stddev"),
                ("kl", "sum"),
                ("kl", "count", _NULLS),
                ("policy_version", "max"),
                ("policy_version", "mean"),
                ("policy_version", "min"),
                ("policy_version_last", "max"),
                ("resumed", "sum"),
                ("multi_version", "sum"),
                ("generated_at", "min"),
                ("generated_at", "max"),
                ("turns", "mean"),
                ("env_turns", "mean"),
                ("env_error", "sum"),
                ("trained", "sum"),
            ]
        )
        .sort_by("iteration")
    )
    return aggregated.rename_columns(
        {
            "length_count": "samples",
            "length_sum": "tokens",
            "length_mean": "length_mean",
            "reward_mean": "reward_mean",
            "reward_stddev": "reward_std",
            "kl_sum": "kl_sum",
            "kl_count": "missing_kl",
            "policy_version_max": "version_max",
            "policy_version_mean": "version_mean",
            "policy_version_min": "version_min",
            "policy_version_last_max": "version_last_max",
            "resumed_sum": "resumed",
            "multi_version_sum": "multi_version",
            "generated_at_min": "first_at",
            "generated_at_max": "last_at",
            "turns_mean": "turns_mean",
            "env_turns_mean": "env_turns_mean",
            "env_error_sum": "env_errors",
            "trained_sum": "trained",
        }
    )


def _finish_counts(rows: pa.Table) -> dict[tuple[int, str], int]:
    """{(iteration, finish_reason): samples}."""
    counted = rows.group_by(["iteration", "finish_reason"]).aggregate(
        [("finish_reason", "count", pc.CountOptions(mode="all"))]
    )
    return dict(
        zip(
            zip(counted["iteration"].to_pylist(), counted["finish_reason"].to_pylist()),
            counted["finish_reason_count"].to_pylist(),
        )
    )


def _reasons(finish: dict[tuple, int]) -> list[str]:
    """The three known finish reasons, then any other the archive holds."""
    seen = {reason for _, reason in finish}
    return [*FINISH_REASONS, *sorted(seen - set(FINISH_REASONS))]


def _component_table(table: pa.Table) -> pa.Table:
    """One row per (sample, reward component): iteration, key, value (null where NaN), failed.

    A component null for a sample (not scored, or absent from the file that holds it) has no row."""
    parts = []
    for iteration_chunk, struct_chunk in zip(table["iteration"].chunks, table["reward_components"].chunks):
        for field, child in zip(struct_chunk.type, struct_chunk.flatten()):
            present = child.is_valid()
            value = child.filter(present).cast(pa.float64())
            failed = pc.is_nan(value)
            parts.append(
                pa.table(
                    {
                        "iteration": iteration_chunk.filter(present),
                        "key": pa.array([field.name] * len(value), pa.string()),
                        "value": pc.if_else(failed, None, value),  # null so that the mean skips failed components
                        "failed": failed.cast(pa.int64()),
                    }
                )
            )
    schema = pa.schema(
        [("iteration", pa.int32()), ("key", pa.string()), ("value", pa.float64()), ("failed", pa.int64())]
    )
    return pa.concat_tables(parts) if parts else schema.empty_table()


def _component_means(components: pa.Table, keys: list[str]) -> dict[Any, dict[str, Any]]:
    """{group: {"reward/NAME": mean, "reward_failed/NAME": count}} grouped by `keys` (last is "key")."""
    aggregated = components.group_by(keys).aggregate([("value", "mean"), ("failed", "sum")])
    out: dict[Any, dict[str, Any]] = {}
    for row in aggregated.sort_by("key").to_pylist():
        group = row[keys[0]] if len(keys) == 2 else None
        entry = out.setdefault(group, {})
        mean = row["value_mean"]
        entry[f"reward/{row['key']}"] = math.nan if mean is None else mean
        entry[f"reward_failed/{row['key']}"] = row["failed_sum"]
    return out


def _restarts(metrics: dict[str, Any] | None) -> int | None:
    """Actors restarted during the iteration (rollout, reward, learner), from the run's metrics."""
    counts = [
        metrics[k]
        for k in ("restarts/rollout", "restarts/reward", "restarts/learner")
        if metrics and metrics.get(k) is not None
    ]
    return int(sum(counts)) if counts else None


def _tokens_per_s(row: dict[str, Any], metrics: dict[str, Any] | None) -> float | None:
    if metrics and metrics.get("tokens_per_s") is not None:
        return float(metrics["tokens_per_s"])
    seconds = (row["last_at"] - row["first_at"]).total_seconds()
    return row["tokens"] / seconds if seconds > 0 else None


def _totals(
    rows: pa.Table, stats: list[dict[str, Any]], components: pa.Table, finish: dict[tuple, int]
) -> dict[str, Any]:
    samples = rows.num_rows
    tokens = sum(s["tokens"] for s in stats)
    timed = [s for s in stats if s["tokens_per_s"]]
    kl_known = [s for s in stats if s["kl"] is not None]
    totals = {
        "iterations": len(stats),
        "samples": samples,
        "tokens": tokens,
        # Σ tokens / Σ generation seconds, over the iterations whose throughput is known.
        "tokens_per_s": (
            sum(s["tokens"] for s in timed) / sum(s["tokens"] / s["tokens_per_s"] for s in timed) if timed else None
        ),
        "reward_mean": pc.mean(rows["reward"]).as_py(),
        "reward_std": pc.stddev(rows["reward"]).as_py(),
        "reward_min": pc.min(rows["reward"]).as_py(),
        "reward_max": pc.max(rows["reward"]).as_py(),
    }
    totals.update(_component_means(components, ["key"]).get(None, {}))
    totals["kl"] = (
        sum(s["kl"] * s["samples"] for s in kl_known) / sum(s["samples"] for s in kl_known) if kl_known else None
    )
    totals["response_length_mean"] = tokens / samples if samples else None
    totals.update(
        {f"finish/{reason}": sum(n for (_, r), n in finish.items() if r == reason) for reason in _reasons(finish)}
    )
    totals["version_lag"] = sum(s["version_lag"] * s["samples"] for s in stats) / samples if samples else None
    for key, pick in (("version_min", min), ("version_max", max), ("version_last_max", max), ("version_spread", max)):
        totals[key] = pick(s[key] for s in stats) if stats else None
    totals["resumed"] = sum(s["resumed"] for s in stats)
    totals["multi_version"] = sum(s["multi_version"] for s in stats)
    known = [s["restarts"] for s in stats if s["restarts"] is not None]
    totals["restarts"] = sum(known) if known else None
    totals["trained"] = sum(s["trained"] for s in stats)
    totals["turns_mean"] = pc.mean(rows["turns"]).as_py()
    totals["env_turns_mean"] = pc.mean(rows["env_turns"]).as_py()
    totals["env_errors"] = sum(s["env_errors"] for s in stats)
    for key in METRIC_FIGURES:  # filtered groups add up; fractions and rounds average over the iterations
        known = [s[key] for s in stats if s[key] is not None]
        totals[key] = (sum(known) if key.endswith("filtered_groups") else sum(known) / len(known)) if known else None
    return totals


def _finite(item: dict[str, Any]) -> dict[str, Any]:
    return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in item.items()}


# --- output --------------------------------------------------------------------------------------
