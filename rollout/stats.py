"""`rollout stats`: per-iteration figures of a run, computed from its archive alone.

Per iteration: samples, generated tokens, generation tokens/s, reward mean/std and each component's
mean (a NaN component is a failed rule: left out of the mean and counted), KL, response length,
finish reasons and policy-version lag; plus the same over the whole archive. Everything is column
arithmetic on the few columns it needs (pyarrow group_by, numpy over list offsets), never a Python
loop over rows, so a million-row archive takes seconds.

Two figures need more than the rows:
- tokens/s: the per-sample `generated_at` stamps only bound when results came back, not when
  generation started, so `tokens_per_s` from the run's `metrics.jsonl` (next to `rollouts/`, or
  the source run's for a replayed archive) is used where it exists; otherwise tokens / (last −
  first `generated_at`) of the iteration.
- KL: token rewards are r_t = −β·kl_t, plus the score on the last token, so a sequence's KL is
  (score − Σ_t r_t) / β. β is the archive's `kl_coef`, or, under an adaptive controller, the
  coefficient the run reported at the end of the previous iteration (`metrics.jsonl`); where β
  is unknown or 0, or the learner columns are null (`rollout generate`), KL is null.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from rollout.archive import archive_files, read_metadata, read_table
from rollout.record import FINISH_REASONS

STATS_COLUMNS = ["iteration", "policy_version", "response_ids", "reward", "reward_components",
                 "token_rewards", "finish_reason", "generated_at"]
KL_COEFS_KEY = "kl_coef_by_iteration"  # metadata a replay writes: {iteration: β} as JSON


# --- the run around the archive ------------------------------------------------------------------

def run_dir_of(archive: str | Path) -> Path:
    """The run directory an archive belongs to: the parent of its `rollouts/` folder."""
    folder = archive_files(archive)[0].parent
    return folder.parent if folder.name == "rollouts" else folder


def read_run_metrics(archive: str | Path) -> dict[int, dict[str, Any]]:
    """The run's `metrics.jsonl` lines by iteration (the last line wins), or {} when there is none.

    A replayed archive has no metrics of its own: its generation happened in the run it was
    replayed from (`replayed_from` in its metadata), whose metrics are read instead.
    """
    seen: set[Path] = set()
    while archive is not None and Path(archive).exists() and Path(archive).resolve() not in seen:
        seen.add(Path(archive).resolve())
        path = run_dir_of(archive) / "metrics.jsonl"
        if path.is_file():
            lines = (json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip())
            return {int(m["iteration"]): m for m in lines if "iteration" in m}
        archive = read_metadata(archive).get("replayed_from")
    return {}


def kl_coefs(metadata: dict[str, str], run_metrics: dict[int, dict[str, Any]],
             iterations: list[int]) -> dict[int, float | None]:
    """The KL coefficient β the learner used in each iteration; None where it cannot be known.

    A fixed coefficient is the metadata's `kl_coef`. An adaptive one (`kl_target` set) moves after
    every update, and the run logs the moved value with that iteration's metrics, so iteration i
    used the value logged by the latest iteration before i, or the initial one for the first.
    """
    if KL_COEFS_KEY in metadata:
        recorded = {int(k): v for k, v in json.loads(metadata[KL_COEFS_KEY]).items()}
        return {i: recorded.get(i) for i in iterations}
    if "kl_coef" not in metadata:
        return dict.fromkeys(iterations)
    initial = float(metadata["kl_coef"])
    if metadata.get("kl_target", "None") == "None":
        return dict.fromkeys(iterations, initial)
    logged = sorted((i, m["kl_coef"]) for i, m in run_metrics.items() if m.get("kl_coef") is not None)
    if not logged:
        return dict.fromkeys(iterations)
    coefs = {}
    for i in iterations:
        earlier = [coef for j, coef in logged if j < i]
        coefs[i] = float(earlier[-1]) if earlier else initial
    return coefs


# --- per-iteration figures -----------------------------------------------------------------------

@dataclass
class RunStats:
    archive: str
    iterations: list[dict[str, Any]]
    totals: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        """Plain JSON: NaN and inf become null."""
        return {"archive": self.archive, "iterations": [_finite(d) for d in self.iterations],
                "totals": _finite(self.totals)}


def compute_stats(archive: str | Path) -> RunStats:
    table = read_table(archive, STATS_COLUMNS)
    metadata = read_metadata(archive)
    run_metrics = read_run_metrics(archive)
    rows = _row_table(table)
    per_iteration = _aggregate_iterations(rows)
    iterations = per_iteration["iteration"].to_pylist()
    finish = _finish_counts(rows)
    components = _component_table(table)
    by_iteration_components = _component_means(components, ["iteration", "key"])
    coefs = kl_coefs(metadata, run_metrics, iterations)

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
        item["kl"] = _kl(row, coefs[i])
        item["response_length_mean"] = row["length_mean"]
        item.update({f"finish/{reason}": finish.get((i, reason), 0) for reason in _reasons(finish)})
        item["version_lag"] = row["version_max"] - row["version_mean"]
        stats.append(item)
    return RunStats(str(archive), stats, _totals(rows, stats, components, finish))


def _row_table(table: pa.Table) -> pa.Table:
    """One row per sample of the scalars the figures need; Σ token rewards per row included."""
    lengths = pc.list_value_length(table["response_ids"]).cast(pa.int64())
    reward = table["reward"].cast(pa.float64())
    # The last token carries the score only when there is a last token.
    score_on_token = pc.if_else(pc.greater(lengths, 0), reward, 0.0)
    return pa.table({
        "iteration": table["iteration"],
        "policy_version": table["policy_version"],
        "length": lengths,
        "reward": reward,
        "score_on_token": score_on_token,
        "token_reward_sum": _row_sums(table["token_rewards"]),
        "finish_reason": table["finish_reason"],
        "generated_at": table["generated_at"],
    })


def _row_sums(column: pa.ChunkedArray) -> pa.ChunkedArray:
    """Σ of each row's float list, in float64; null where the list is null. (N,) lists -> (N,)."""
    sums = []
    for chunk in column.chunks:
        offsets = np.asarray(chunk.offsets)  # absolute positions in chunk.values, slices included
        values = chunk.values.to_numpy(zero_copy_only=False).astype(np.float64)
        running = np.concatenate([[0.0], np.cumsum(values)])
        sums.append(pa.array(running[offsets[1:]] - running[offsets[:-1]],
                             mask=chunk.is_null().to_numpy(zero_copy_only=False)))
    return pa.chunked_array(sums, type=pa.float64())


_NULLS = pc.CountOptions(mode="only_null")


def _aggregate_iterations(rows: pa.Table) -> pa.Table:
    aggregated = rows.group_by("iteration").aggregate([
        ("length", "count"), ("length", "sum"), ("length", "mean"),
        ("reward", "mean"), ("reward", "stddev"),
        ("score_on_token", "sum"), ("token_reward_sum", "sum"), ("token_reward_sum", "count", _NULLS),
        ("policy_version", "max"), ("policy_version", "mean"),
        ("generated_at", "min"), ("generated_at", "max"),
    ]).sort_by("iteration")
    return aggregated.rename_columns({
        "length_count": "samples", "length_sum": "tokens", "length_mean": "length_mean",
        "reward_mean": "reward_mean", "reward_stddev": "reward_std",
        "score_on_token_sum": "score_sum", "token_reward_sum_sum": "token_reward_sum",
        "token_reward_sum_count": "missing_token_rewards",
        "policy_version_max": "version_max", "policy_version_mean": "version_mean",
        "generated_at_min": "first_at", "generated_at_max": "last_at",
    })



def _finish_counts(rows: pa.Table) -> dict[tuple[int, str], int]:
    """{(iteration, finish_reason): samples}."""
    counted = rows.group_by(["iteration", "finish_reason"]).aggregate(
        [("finish_reason", "count", pc.CountOptions(mode="all"))])
    return dict(zip(zip(counted["iteration"].to_pylist(), counted["finish_reason"].to_pylist()),
                    counted["finish_reason_count"].to_pylist()))


def _reasons(finish: dict[tuple, int]) -> list[str]:
    """The three known finish reasons, then any other the archive holds."""
    seen = {reason for _, reason in finish}
    return [*FINISH_REASONS, *sorted(seen - set(FINISH_REASONS))]


def _component_table(table: pa.Table) -> pa.Table:
    """One row per (sample, reward component): iteration, key, value (null where NaN), failed."""
    iterations, keys, values = [], [], []
    for iteration_chunk, map_chunk in zip(table["iteration"].chunks, table["reward_components"].chunks):
        offsets = np.asarray(map_chunk.offsets)
        start, stop = int(offsets[0]), int(offsets[-1])
        iterations.append(np.repeat(iteration_chunk.to_numpy(zero_copy_only=False), np.diff(offsets)))
        keys.append(map_chunk.keys.slice(start, stop - start))
        values.append(map_chunk.items.slice(start, stop - start).cast(pa.float64()))
    value = pa.chunked_array(values, type=pa.float64())
    failed = pc.is_nan(value)
    return pa.table({
        "iteration": pa.chunked_array([pa.array(i, pa.int32()) for i in iterations], type=pa.int32()),
        "key": pa.chunked_array(keys, type=pa.string()),
        "value": pc.if_else(failed, None, value),  # null so that the mean skips failed components
        "failed": failed.cast(pa.int64()),
    })


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


def _tokens_per_s(row: dict[str, Any], metrics: dict[str, Any] | None) -> float | None:
    if metrics and metrics.get("tokens_per_s") is not None:
        return float(metrics["tokens_per_s"])
    seconds = (row["last_at"] - row["first_at"]).total_seconds()
    return row["tokens"] / seconds if seconds > 0 else None


def _kl(row: dict[str, Any], coef: float | None) -> float | None:
    """Mean sequence KL of an iteration: Σ_rows (score − Σ_t r_t) / β / samples."""
    if row["missing_token_rewards"] or not coef:
        return None
    return (row["score_sum"] - row["token_reward_sum"]) / coef / row["samples"]


def _totals(rows: pa.Table, stats: list[dict[str, Any]], components: pa.Table,
            finish: dict[tuple, int]) -> dict[str, Any]:
    samples = rows.num_rows
    tokens = sum(s["tokens"] for s in stats)
    timed = [s for s in stats if s["tokens_per_s"]]
    kl_known = [s for s in stats if s["kl"] is not None]
    totals = {
        "iterations": len(stats),
        "samples": samples,
        "tokens": tokens,
        # Σ tokens / Σ generation seconds, over the iterations whose throughput is known.
        "tokens_per_s": (sum(s["tokens"] for s in timed) / sum(s["tokens"] / s["tokens_per_s"] for s in timed)
                         if timed else None),
        "reward_mean": pc.mean(rows["reward"]).as_py(),
        "reward_std": pc.stddev(rows["reward"]).as_py(),
    }
    totals.update(_component_means(components, ["key"]).get(None, {}))
    totals["kl"] = (sum(s["kl"] * s["samples"] for s in kl_known) / sum(s["samples"] for s in kl_known)
                    if kl_known else None)
    totals["response_length_mean"] = tokens / samples if samples else None
    totals.update({f"finish/{reason}": sum(n for (_, r), n in finish.items() if r == reason)
                   for reason in _reasons(finish)})
    totals["version_lag"] = (sum(s["version_lag"] * s["samples"] for s in stats) / samples
                             if samples else None)
    return totals


def _finite(item: dict[str, Any]) -> dict[str, Any]:
    return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in item.items()}


# --- output --------------------------------------------------------------------------------------

_COLUMNS = [  # (header, key, format) in table order; components are inserted after the reward
    ("iter", "iteration", "d"), ("samples", "samples", "d"), ("tokens", "tokens", "d"),
    ("tok/s", "tokens_per_s", ".1f"), ("reward", "reward_mean", ".4f"), ("std", "reward_std", ".4f"),
    ("kl", "kl", ".4f"), ("len", "response_length_mean", ".2f"),
    ("stop", "finish/stop", "d"), ("length", "finish/length", "d"), ("error", "finish/error", "d"),
    ("lag", "version_lag", ".2f"),
]
_COMPARE_KEYS = ["samples", "tokens_per_s", "reward_mean", "kl", "response_length_mean", "version_lag"]


def format_table(run: RunStats) -> str:
    """An aligned table: one line per iteration, then `all` for the whole archive."""
    columns = _columns_with_components(run)
    header = [h for h, _, _ in columns]
    body = [[_cell(item.get(key), fmt) for _, key, fmt in columns] for item in run.iterations]
    totals = [_cell(run.totals.get(key), fmt) for _, key, fmt in columns]
    totals[0] = "all"
    return f"{run.archive}\n" + _render(header, [*body, totals])


def format_comparison(a: RunStats, b: RunStats) -> str:
    """Two runs side by side, iterations matched by number; `A`/`B` columns for each figure."""
    by_iteration = [{s["iteration"]: s for s in run.iterations} for run in (a, b)]
    keys = _COMPARE_KEYS + sorted({k for run in (a, b) for k in run.totals if k.startswith("reward/")})
    formats = {key: fmt for _, key, fmt in _COLUMNS} | {k: ".4f" for k in keys if k.startswith("reward/")}
    names = {key: header for header, key, _ in _COLUMNS} | {k: "r/" + k[len("reward/"):] for k in keys
                                                           if k.startswith("reward/")}
    header = ["iter"] + [f"{names[k]} {side}" for k in keys for side in "AB"]
    lines = []
    for i in sorted(by_iteration[0].keys() | by_iteration[1].keys()):
        cells = [str(i)]
        for key in keys:
            cells += [_cell(run.get(i, {}).get(key), formats[key]) for run in by_iteration]
        lines.append(cells)
    lines.append(["all"] + [_cell(run.totals.get(k), formats[k]) for k in keys for run in (a, b)])
    return f"A = {a.archive}\nB = {b.archive}\n" + _render(header, lines)


def _columns_with_components(run: RunStats) -> list[tuple[str, str, str]]:
    names = sorted(k[len("reward/"):] for k in run.totals if k.startswith("reward/"))
    extra = [(f"r/{name}", f"reward/{name}", ".4f") for name in names]
    # A failure column only for components that ever failed: most runs have none.
    extra += [(f"fail/{name}", f"reward_failed/{name}", "d") for name in names
              if run.totals.get(f"reward_failed/{name}")]
    at = [key for _, key, _ in _COLUMNS].index("reward_std") + 1
    return [*_COLUMNS[:at], *extra, *_COLUMNS[at:]]


def _cell(value: Any, fmt: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return format(value, fmt)


def _render(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(cells[i]) for cells in [header, *rows]) for i in range(len(header))]
    return "\n".join("  ".join(cell.rjust(w) for cell, w in zip(cells, widths)) for cells in [header, *rows]) + "\n"


def plot_runs(runs: list[RunStats], png: str | Path, labels: list[str] | None = None) -> None:
    """Reward (mean ± std) and generation tokens/s over iterations, one line per run, to a PNG."""
    # A bare Figure renders with Agg and leaves the process-wide pyplot backend alone.
    from matplotlib.figure import Figure

    labels = labels or [Path(run.archive).name for run in runs]
    figure = Figure(figsize=(9, 6.5), layout="constrained")
    reward_axis, speed_axis = figure.subplots(2, 1, sharex=True)
    for run, label in zip(runs, labels):
        x = np.array([s["iteration"] for s in run.iterations])
        mean = np.array([_nan_if_none(s["reward_mean"]) for s in run.iterations])
        std = np.array([_nan_if_none(s["reward_std"]) for s in run.iterations])
        (line,) = reward_axis.plot(x, mean, marker=".", label=label)
        reward_axis.fill_between(x, mean - std, mean + std, color=line.get_color(), alpha=0.15)
        speed_axis.plot(x, [_nan_if_none(s["tokens_per_s"]) for s in run.iterations], marker=".", label=label)
    reward_axis.set_ylabel("reward (mean ± std)")
    speed_axis.set_ylabel("generated tokens / s")
    speed_axis.set_xlabel("iteration")
    for axis in (reward_axis, speed_axis):
        axis.grid(alpha=0.3)
        axis.legend(loc="best")
    figure.savefig(png, dpi=110)


def _nan_if_none(value: float | None) -> float:
    return math.nan if value is None else value
