"""How `rollout stats` shows a run's figures: the per-iteration table, the summary under it, a
side-by-side comparison of two runs, and the reward and KL curves as a PNG (`RunStats` from
`rollout.offline.stats`)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from rollout.driver.metrics import summary_lines
from rollout.offline.stats import RunStats

_COLUMNS = [  # (header, key, format) in table order; components are inserted after the reward
    ("iter", "iteration", "d"),
    ("samples", "samples", "d"),
    ("tokens", "tokens", "d"),
    ("tok/s", "tokens_per_s", ".1f"),
    ("reward", "reward_mean", ".4f"),
    ("std", "reward_std", ".4f"),
    ("kl", "kl", ".4f"),
    ("len", "response_length_mean", ".2f"),
    ("stop", "finish/stop", "d"),
    ("length", "finish/length", "d"),
    ("error", "finish/error", "d"),
    ("lag", "version_lag", ".2f"),
]
_COMPARE_KEYS = ["samples", "tokens_per_s", "reward_mean", "kl", "response_length_mean", "version_lag"]


def format_table(run: RunStats, last: int | None = None, every: int | None = None) -> str:
    """An aligned table: one line per iteration `shown`, then `all` for the whole archive, then the
    first-fifth -> last-fifth summary `rollout run` ends with (over every iteration)."""
    columns = _columns_with_components(run)
    header = [h for h, _, _ in columns]
    body = [[_cell(item.get(key), fmt) for _, key, fmt in columns] for item in run.shown(last, every)]
    totals = [_cell(run.totals.get(key), fmt) for _, key, fmt in columns]
    totals[0] = "all"
    summary = "\n".join(summary_lines(run.iterations)) + "\n" if run.iterations else ""
    return f"{run.archive}\n" + _render(header, [*body, totals]) + "\n" + summary + format_evaluations(run.evaluations)


def format_evaluations(evaluations: list[dict[str, Any]]) -> str:
    """The held-out evaluations, one line each: after which iteration (`start`: before any update), the
    weights' version, pass@k, mean@k, the reward and each component, the response length."""
    if not evaluations:
        return ""
    k = evaluations[-1].get("eval/k", 1)
    components = sorted(
        {key for e in evaluations for key in e if key.endswith("/mean") and key.count("/") == 2}, key=str
    )
    columns = [
        ("after", "eval/iteration", "d"),
        ("version", "eval/policy_version", "d"),
        ("prompts", "eval/prompts", "d"),
        (f"pass@{k}", "eval/pass@k", ".4f"),
        (f"mean@{k}", "eval/mean@k", ".4f"),
        ("reward", "eval/reward_mean", ".4f"),
        *((f"r/{c[5:-5]}", c, ".4f") for c in components),
        ("len", "eval/response_tokens", ".2f"),
        ("s", "time/eval", ".1f"),
    ]
    rows = [
        ["start" if e.get("eval/iteration") == -1 else _cell(e.get(key), fmt) for _, key, fmt in columns[:1]]
        + [_cell(e.get(key), fmt) for _, key, fmt in columns[1:]]
        for e in evaluations
    ]
    return f"\nheld-out evaluations ({len(evaluations)}):\n" + _render([h for h, _, _ in columns], rows)


def format_comparison(a: RunStats, b: RunStats) -> str:
    """Two runs side by side, iterations matched by number; `A`/`B` columns for each figure."""
    by_iteration = [{s["iteration"]: s for s in run.iterations} for run in (a, b)]
    keys = _COMPARE_KEYS + sorted({k for run in (a, b) for k in run.totals if k.startswith("reward/")})
    formats = {key: fmt for _, key, fmt in _COLUMNS} | {k: ".4f" for k in keys if k.startswith("reward/")}
    names = {key: header for header, key, _ in _COLUMNS} | {
        k: "r/" + k[len("reward/") :] for k in keys if k.startswith("reward/")
    }
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
    names = sorted(k[len("reward/") :] for k in run.totals if k.startswith("reward/"))
    extra = [(f"r/{name}", f"reward/{name}", ".4f") for name in names]
    # A failure column only for components that ever failed: most runs have none.
    extra += [
        (f"fail/{name}", f"reward_failed/{name}", "d") for name in names if run.totals.get(f"reward_failed/{name}")
    ]
    at = [key for _, key, _ in _COLUMNS].index("reward_std") + 1
    # Columns of what a run used, shown only where it did: restarts, the versions of resumed samples
    # (first token's oldest and newest, last token's newest), samples left out of the update,
    # episodes (turns, environment turns, environment errors), the clip fractions, dynamic sampling.
    optional = [("restarts", "restarts", "d")] if run.totals.get("restarts") else []
    if run.totals.get("resumed") or run.totals.get("multi_version"):  # partial rollouts: the versions' spread
        optional += [
            ("v min", "version_min", "d"),
            ("v max", "version_max", "d"),
            ("v last", "version_last_max", "d"),
            ("resumed", "resumed", "d"),
        ]
    if run.totals.get("trained") not in (None, run.totals.get("samples")):
        optional.append(("trained", "trained", "d"))
    if run.totals.get("env_turns_mean"):
        optional += [
            ("turns", "turns_mean", ".2f"),
            ("env turns", "env_turns_mean", ".2f"),
            ("env err", "env_errors", "d"),
        ]
    if run.totals.get("clip_frac") is not None:
        optional += [
            ("clip", "clip_frac", ".3f"),
            ("clip+", "clip_frac_high", ".3f"),
            ("clip-", "clip_frac_low", ".3f"),
        ]
    if run.totals.get("clipped_sequences") is not None:
        optional.append(("clip seq", "clipped_sequences", ".3f"))
    if run.totals.get("mismatch/kl") is not None:
        optional.append(("mismatch kl", "mismatch/kl", ".1e"))
    if run.totals.get("dynamic_sampling/rounds") is not None:
        optional += [
            ("filtered", "dynamic_sampling/filtered_groups", "d"),
            ("rounds", "dynamic_sampling/rounds", ".2f"),
        ]
    return [*_COLUMNS[:at], *extra, *_COLUMNS[at:], *optional]


def _cell(value: Any, fmt: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return format(value, fmt)


def _render(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(cells[i]) for cells in [header, *rows]) for i in range(len(header))]
    return "\n".join("  ".join(cell.rjust(w) for cell, w in zip(cells, widths)) for cells in [header, *rows]) + "\n"


def plot_runs(runs: list[RunStats], png: str | Path, labels: list[str] | None = None):
    """Reward and generation tokens/s over iterations, one colour per run, to a PNG.

    Each iteration's mean is a faint line; over it, its moving average (`smooth`) and a band of the
    moving average of the per-sample std around it, cut to the rewards the archive holds, so a
    binary reward's band never leaves [0, 1]. Markers only where there are few iterations."""
    # A bare Figure renders with Agg and leaves the process-wide pyplot backend alone.
    from matplotlib.figure import Figure

    labels = labels or [Path(run.archive).name for run in runs]
    figure = Figure(figsize=(9, 6.5), layout="constrained")
    reward_axis, speed_axis = figure.subplots(2, 1, sharex=True)
    for run, label in zip(runs, labels):
        x = np.array([s["iteration"] for s in run.iterations])
        mean = np.array([_nan_if_none(s["reward_mean"]) for s in run.iterations])
        std = np.array([_nan_if_none(s["reward_std"]) for s in run.iterations])
        speed = np.array([_nan_if_none(s["tokens_per_s"]) for s in run.iterations])
        marker = "." if len(x) <= 60 else None
        (raw,) = reward_axis.plot(x, mean, marker=marker, alpha=0.35, linewidth=0.8)
        colour = raw.get_color()
        smoothed = smooth(mean)
        reward_axis.plot(x, smoothed, color=colour, linewidth=2, label=label)
        low, high = _nan_if_none(run.totals.get("reward_min")), _nan_if_none(run.totals.get("reward_max"))
        band = smooth(std)
        reward_axis.fill_between(
            x,
            np.clip(smoothed - band, low, high),
            np.clip(smoothed + band, low, high),
            color=colour,
            alpha=0.15,
            linewidth=0,
        )
        speed_axis.plot(x, speed, color=colour, alpha=0.35, linewidth=0.8, marker=marker)
        speed_axis.plot(x, smooth(speed), color=colour, linewidth=2, label=label)
    window = max(smoothing_window(len(run.iterations)) for run in runs) if runs else 1
    reward_axis.set_ylabel(f"reward (moving mean of {window}, ± std)" if window > 1 else "reward (mean ± std)")
    speed_axis.set_ylabel("generated tokens / s")
    speed_axis.set_xlabel("iteration")
    for axis in (reward_axis, speed_axis):
        axis.grid(alpha=0.3)
        axis.legend(loc="best")
    figure.savefig(png, dpi=110)
    return figure


def smoothing_window(points: int) -> int:
    """About 1/25 of the run, odd, at least 1: 500 iterations -> 21, 20 -> 1."""
    return max(1, points // 25) | 1


def smooth(values: np.ndarray) -> np.ndarray:
    """Centred moving average over `smoothing_window(len)` points, NaNs skipped, the ends over what
    there is. (T,) -> (T,)."""
    window = smoothing_window(len(values))
    if window == 1:
        return values
    ok = np.isfinite(values)
    kernel = np.ones(window)
    total = np.convolve(np.where(ok, values, 0.0), kernel, mode="same")  # Σ of the finite values in the window
    count = np.convolve(ok.astype(float), kernel, mode="same")
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / count, np.nan)


def _nan_if_none(value: float | None) -> float:
    return math.nan if value is None else value
