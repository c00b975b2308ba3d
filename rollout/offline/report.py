"""`rollout report RUN_DIR`: one self-contained HTML page of a run, readable offline in any browser.

The charts are SVG drawn here, with no script and nothing fetched: reward and each component, KL
and its coefficient, response length and finish reasons, tokens/s and seconds per stage,
policy-version lag and restarts; then the run's summary and a table of its last iteration's first
samples. The per-iteration figures are `rollout stats`' (from the archive alone); the KL
coefficient, stage times and restarts come from the run's metrics.jsonl where it has one. Past 60
iterations each line is drawn faint with its moving average over it (`rollout stats --plot`'s).
"""

from __future__ import annotations

import html
import math
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from rollout.archive import iter_batches, last_archived_iteration, read_metadata, read_run_metrics
from rollout.driver.metrics import STAGES, summary_lines
from rollout.driver.tracking import sample_table
from rollout.offline.stats import compute_stats
from rollout.offline.stats_view import smooth

PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf")
WIDTH, HEIGHT, LEFT, RIGHT, TOP, BOTTOM = 480, 220, 60, 12, 12, 28
SAMPLE_COLUMNS = [
    "iteration",
    "prompt_id",
    "sample_index",
    "prompt",
    "response",
    "finish_reason",
    "reward",
    "reward_components",
    "response_ids",
    "response_mask",
]


def write_report(run_dir: str | Path, out: str | Path, *, samples: int = 8) -> int:
    """Writes the page to `out`; returns the number of iterations it shows."""
    stats = compute_stats(run_dir)
    metrics = read_run_metrics(run_dir)
    rows = stats.iterations
    x = [row["iteration"] for row in rows]

    def column(key: str, source: str = "stats") -> list[float | None]:
        return [(row if source == "stats" else metrics.get(row["iteration"], {})).get(key) for row in rows]

    components = sorted({k for row in rows for k in row if k.startswith("reward/")})
    reasons = sorted({k for row in rows for k in row if k.startswith("finish/")})
    charts = [
        line_chart(
            "Reward (mean) and each component",
            x,
            {"reward": column("reward_mean"), **{k[7:]: column(k) for k in components}},
        ),
        line_chart("KL to the reference (mean Σ per sample)", x, {"kl": column("kl")}),
        line_chart("KL coefficient", x, {"kl_coef": column("kl_coef", "metrics")}),
        line_chart("Response length (tokens)", x, {"mean": column("response_length_mean")}),
        line_chart(
            "Finish reasons (fraction of samples)",
            x,
            {k[7:]: [c / max(row["samples"], 1) for c, row in zip(column(k), rows)] for k in reasons},
        ),
        line_chart(
            "Tokens/s per stage (generated tokens / the stage's seconds)",
            x,
            {
                "generate": column("tokens_per_s"),
                **{
                    s: _per_second(column("tokens"), column(f"time/{s}", "metrics"))
                    for s in STAGES
                    if s not in ("generate", "weight_sync", "checkpoint")  # the last two run on their own cadence
                },
            },
        ),
        line_chart("Seconds per stage", x, {s: column(f"time/{s}", "metrics") for s in STAGES}),
        line_chart("Policy-version lag (mean, versions)", x, {"lag": column("version_lag")}),
        line_chart(
            "Actor restarts (cumulative)",
            x,
            {kind: _cumulative(column(f"restarts/{kind}", "metrics")) for kind in ("rollout", "reward", "learner")},
        ),
    ]
    history = [metrics[i] for i in x if i in metrics] or rows
    summary = summary_lines(history) if history else ["no iterations"]
    totals = stats.totals
    page = _PAGE.format(
        title=html.escape(f"Run report: {Path(run_dir).resolve().name}"),
        heading=html.escape(Path(run_dir).resolve().name),
        facts=html.escape(
            f"{len(rows)} iterations, {totals.get('samples', 0)} samples, "
            f"{totals.get('tokens', 0)} generated tokens; archive {stats.archive}"
        ),
        charts="\n".join(charts),
        summary=html.escape("\n".join(summary)),
        samples=_sample_html(run_dir, samples),
    )
    Path(out).write_text(page, encoding="utf-8")
    return len(rows)


def line_chart(title: str, x: list[int], series: dict[str, list[float | None]]) -> str:
    """One figure: an SVG line per series over the iterations, y from the data's own range."""
    finite = [v for values in series.values() for v in values if _finite(v)]
    caption = f"<figcaption>{html.escape(title)}</figcaption>"
    if not x or not finite:
        return f'<figure class="chart-box">{caption}<p class="empty">no data in this run</p></figure>'
    low, high = min(finite), max(finite)
    if high - low < 1e-12:  # a constant: a band around it
        pad = abs(low) * 0.1 or 0.5
        low, high = low - pad, high + pad
    first, last = x[0], x[-1]

    def sx(i: float) -> float:
        return LEFT + (WIDTH - LEFT - RIGHT) * (0.5 if last == first else (i - first) / (last - first))

    def sy(v: float) -> float:
        return TOP + (HEIGHT - TOP - BOTTOM) * (1 - (v - low) / (high - low))

    parts = [
        f'<svg class="chart" viewBox="0 0 {WIDTH} {HEIGHT}" width="{WIDTH}" height="{HEIGHT}" '
        f'role="img" aria-label="{html.escape(title)}">'
    ]
    for fraction in (0.0, 0.5, 1.0):
        value = low + fraction * (high - low)
        parts.append(
            f'<line class="grid" x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{sy(value):.1f}" y2="{sy(value):.1f}"/>'
            f'<text class="tick" x="{LEFT - 4}" y="{sy(value) + 4:.1f}" text-anchor="end">{_short(value)}</text>'
        )
    parts.append(f'<text class="tick" x="{sx(first):.1f}" y="{HEIGHT - 8}" text-anchor="middle">{first}</text>')
    if last != first:
        parts.append(f'<text class="tick" x="{sx(last):.1f}" y="{HEIGHT - 8}" text-anchor="middle">{last}</text>')
    legend = []
    for (name, values), colour in zip(series.items(), PALETTE * 4):
        points = [(i, v) for i, v in zip(x, values) if _finite(v)]
        if not points:
            continue
        raw = np.array([v if _finite(v) else math.nan for v in values], dtype=float)
        many = len(x) > 60
        parts.append(
            f'<path class="series" data-series="{html.escape(name)}" data-points="{len(points)}" '
            f'd="{_path(x, raw, sx, sy)}" stroke="{colour}" fill="none" '
            f'stroke-width="{1 if many else 1.8}" opacity="{0.35 if many else 1}"/>'
        )
        if many:
            parts.append(
                f'<path class="smoothed" d="{_path(x, smooth(raw), sx, sy)}" stroke="{colour}" '
                f'fill="none" stroke-width="2"/>'
            )
        else:
            parts += [
                f'<circle cx="{sx(i):.1f}" cy="{sy(v):.1f}" r="2.2" fill="{colour}">'
                f"<title>{html.escape(name)} at iteration {i}: {_short(v)}</title></circle>"
                for i, v in points
            ]
        legend.append(f'<span class="key"><i style="background:{colour}"></i>{html.escape(name)}</span>')
    parts.append("</svg>")
    return f'<figure class="chart-box">{caption}{"".join(parts)}<div class="legend">{"".join(legend)}</div></figure>'


def _path(x: list[int], values: np.ndarray, sx, sy) -> str:
    """SVG path data through the finite values; a gap (NaN) starts a new segment."""
    commands, pen_down = [], False
    for i, v in zip(x, values):
        if not math.isfinite(v):
            pen_down = False
            continue
        commands.append(f"{'L' if pen_down else 'M'}{sx(i):.1f},{sy(v):.1f}")
        pen_down = True
    return " ".join(commands)


def _sample_html(run_dir: str | Path, rows: int) -> str:
    """The last iteration's first `rows` samples, read batch by batch (only those rows are kept)."""
    last = last_archived_iteration(run_dir)
    kept = []
    for batch in iter_batches(run_dir, SAMPLE_COLUMNS):
        mine = batch.filter(pc.equal(batch.column("iteration"), last))
        kept += [mine] if mine.num_rows else []
        if sum(b.num_rows for b in kept) >= rows:
            break
    if not kept:
        return '<p class="empty">no samples archived</p>'
    samples = pa.Table.from_batches(kept)
    table = sample_table(samples, samples, rows)
    cells = [[html.escape(_cell(v)) for v in row] for row in table.rows]
    decode = _decoder(run_dir)
    at = table.columns.index("response")
    episodes = False
    for row, ids, mask in zip(
        cells, samples.column("response_ids").to_pylist(), samples.column("response_mask").to_pylist()
    ):
        if decode is not None and 0 in mask:  # an episode: the environment's turns marked
            row[at] = "".join(
                f'<span class="{"env" if env else "model"}">{html.escape(decode(part))}</span>'
                for env, part in trajectory(ids, mask)
            )
            episodes = True
    head = "".join(f"<th>{html.escape(c)}</th>" for c in table.columns)
    body = "".join("<tr>" + "".join(f"<td>{cell}</td>" for cell in row) + "</tr>" for row in cells)
    key = ' <span class="env">Shaded</span>: the environment\'s turns.' if episodes else ""
    return (
        f"<p>Iteration {last}, the first {len(table.rows)} samples.{key}</p>"
        f'<table class="samples"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'
    )


def trajectory(ids: list[int], mask: list[int]) -> list[tuple[bool, list[int]]]:
    """An episode's response tokens cut into its turns: (written by the environment, tokens), in order."""
    turns: list[tuple[bool, list[int]]] = []
    for token, model in zip(ids, mask):
        env = model == 0
        if not turns or turns[-1][0] != env:
            turns.append((env, []))
        turns[-1][1].append(token)
    return turns


def _decoder(run_dir: str | Path):
    """The run's tokenizer's decode, to show an episode's turns apart; None where the model is not on this
    machine (the response text is shown whole)."""
    model = read_metadata(run_dir).get("model")
    if not model or not Path(model).is_dir():
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model).decode


def _per_second(counts: list[Any], seconds: list[Any]) -> list[float | None]:
    return [c / t if _finite(c) and _finite(t) and t > 0 else None for c, t in zip(counts, seconds)]


def _cell(value: Any) -> str:
    if value is None:  # a reward component that is NaN: its rule failed on this sample
        return "failed"
    return _short(value) if isinstance(value, float) else str(value)


def _cumulative(values: list[Any]) -> list[float | None]:
    if not any(_finite(v) for v in values):
        return values
    return list(np.cumsum([v if _finite(v) else 0 for v in values]).astype(float))


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def _short(value: float) -> str:
    """4 significant digits, thousands and millions as k and M: fits an axis label."""
    for scale, suffix in ((1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:.4g}{suffix}"
    return f"{value:.4g}"


_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{title}</title>
<style>
  body {{ font: 14px/1.4 system-ui, sans-serif; margin: 24px; color: #222; }}
  h1 {{ font-size: 20px; margin: 0 0 4px; }}
  .facts {{ color: #555; margin: 0 0 16px; }}
  .charts {{ display: flex; flex-wrap: wrap; gap: 16px; }}
  .chart-box {{ margin: 0; border: 1px solid #ddd; border-radius: 6px; padding: 8px; width: {width}px; }}
  figcaption {{ font-weight: 600; margin-bottom: 4px; }}
  .grid {{ stroke: #e5e5e5; }}
  .tick {{ font-size: 10px; fill: #666; }}
  .legend {{ font-size: 12px; }}
  .key {{ margin-right: 12px; white-space: nowrap; }}
  .key i {{ display: inline-block; width: 10px; height: 10px; margin-right: 4px; border-radius: 2px; }}
  .empty {{ color: #888; }}
  pre {{ background: #f6f6f6; padding: 8px; overflow-x: auto; }}
  table.samples {{ border-collapse: collapse; font-size: 12px; }}
  .samples th, .samples td {{ border: 1px solid #ddd; padding: 3px 6px; text-align: left; vertical-align: top;
                              white-space: pre-wrap; max-width: 420px; }}
  .env {{ background: #e8eefc; color: #35508a; }}
</style>
</head>
<body>
<h1>{heading}</h1>
<p class="facts">{facts}</p>
<div class="charts">
{charts}
</div>
<h2>Summary</h2>
<pre>{summary}</pre>
<h2>Samples</h2>
{samples}
</body>
</html>
""".replace("{width}", str(WIDTH))
