"""The held-out evaluation's chart in `rollout report`: pass@k, mean@k and the eval reward over the iterations
they ran after, beside the training reward (`eval_chart_specs`, one more entry of `report.chart_specs`)."""

from __future__ import annotations

from typing import Any

import numpy as np

LONG = 60  # past this many iterations the report draws lines alone, no markers: sparse points are joined


def eval_chart_specs(rows: list[dict], metrics: dict[int, dict]) -> list[dict[str, Any]]:
    """[] for a run without evaluations; else one line chart's keyword arguments: the training reward of every
    iteration and, on the iterations whose metrics line holds an evaluation, its figures (joined by straight
    lines between evaluations on a long run, where the report draws no markers)."""
    lines = [metrics.get(row["iteration"], {}) for row in rows]
    if not any("eval/pass@k" in line for line in lines):
        return []
    k = next(line["eval/k"] for line in reversed(lines) if "eval/k" in line)

    def held_out(key: str) -> list[float | None]:
        values = [line.get(key) for line in lines]
        return joined(values) if len(rows) > LONG else values

    return [
        dict(
            title=f"Held-out evaluation (pass@{k}, mean@{k}, reward) beside the training reward",
            y_title="reward (mean per sample) / fraction of prompts",
            series={
                "training reward": [row.get("reward_mean") for row in rows],
                f"eval pass@{k}": held_out("eval/pass@k"),
                f"eval mean@{k}": held_out("eval/mean@k"),
                "eval reward": held_out("eval/reward_mean"),
            },
        )
    ]


def joined(values: list[float | None]) -> list[float | None]:
    """Values between the first and last known one filled in linearly (what a line through the points draws);
    None outside them."""
    known = [i for i, v in enumerate(values) if v is not None and v == v]
    if len(known) < 2:
        return values
    filled = np.interp(np.arange(known[0], known[-1] + 1), known, [values[i] for i in known])
    return [None] * known[0] + [float(v) for v in filled] + [None] * (len(values) - known[-1] - 1)
