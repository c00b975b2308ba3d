"""`rollout report RUN_DIR`: one self-contained HTML page of a run, readable offline in any browser.

The charts are SVG drawn here, with no script and nothing fetched: reward and each component, KL
and its coefficient, response length and finish reasons, tokens/s and seconds per stage,
policy-version lag (with partial rollouts, each iteration's version spread and resumed samples) and
restarts, and the start-up; then the run's summary and a table of its last
iteration's first samples. The per-iteration figures are `rollout stats`' (from the archive alone);
the KL coefficient, stage times and restarts come from the run's metrics.jsonl where it has one.

Each chart is read as a reader reads a chart on paper: both axes titled with their unit, ticks at
round numbers (1, 2 or 5 times a power of ten), a y axis that fits what is drawn. The stage charts
leave each start's first iteration out (engines load inside it; it would flatten the steady
iterations) and the start-up chart shows it beside the steady median; where a chart's values span
1000 times or more (a stage of microseconds beside one of seconds) its axis is logarithmic. Past 60
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
from rollout.archive.manifest import read_manifest
from rollout.driver.metrics import STAGES, summary_lines
from rollout.driver.tracking import sample_table
from rollout.offline.eval_series import eval_chart_specs
from rollout.offline.stats import compute_stats
from rollout.offline.stats_view import smooth

PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf")
WIDTH, HEIGHT, LEFT, RIGHT, TOP, BOTTOM = 480, 240, 66, 14, 12, 40
BAR_LEFT, BAR_RIGHT, BAR_ROW = 140, 52, 9  # the start-up chart: stage names, value labels, a bar's height
LOG_SPAN = 1000.0  # an "auto" axis is logarithmic where its positive values span this many times or more
TIME_STAGES = (*STAGES, "iteration", "wall")
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
    startup = startup_iterations(run_dir, x) if len(x) > 1 else []
    charts = [line_chart(x=x, **spec) for spec in chart_specs(rows, metrics, startup)]
    charts.append(startup_chart(x, metrics, startup))
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


def chart_specs(rows: list[dict], metrics: dict[int, dict], startup: list[int]) -> list[dict[str, Any]]:
    """The page's line charts, each as `line_chart`'s keyword arguments: a title, the y axis's title with
    its unit, and the series by name. A new figure (a held-out eval, say) is one more entry here;
    `series_with_prefix` gathers a family of metrics (`eval/...`) into series."""

    def column(key: str, source: str = "stats") -> list[float | None]:
        return [(row if source == "stats" else metrics.get(row["iteration"], {})).get(key) for row in rows]

    reasons = sorted({k for row in rows for k in row if k.startswith("finish/")})
    apart = startup_note(rows, metrics, startup)
    return [
        dict(
            title="Reward (mean) and each component",
            y_title="reward (mean per sample)",
            series={"reward": column("reward_mean"), **series_with_prefix(rows, "reward/")},
        ),
        dict(
            title="KL to the reference (mean Σ per sample)", y_title="KL (nats per sample)", series={"kl": column("kl")}
        ),
        dict(title="KL coefficient", y_title="coefficient (per nat)", series={"kl_coef": column("kl_coef", "metrics")}),
        dict(
            title="Response length (tokens)",
            y_title="tokens (mean per sample)",
            series={"mean": column("response_length_mean")},
        ),
        dict(
            title="Finish reasons (fraction of samples)",
            y_title="fraction of samples",
            series={k[7:]: [c / max(row["samples"], 1) for c, row in zip(column(k), rows)] for k in reasons},
            zero_based=True,
        ),
        dict(
            title="Tokens/s per stage (generated tokens / the stage's seconds)",
            y_title="tokens / s",
            series={
                "generate": column("tokens_per_s"),
                **{
                    s: _per_second(column("tokens"), column(f"time/{s}", "metrics"))
                    for s in STAGES
                    if s not in ("generate", "weight_sync", "checkpoint")  # the last two run on their own cadence
                },
            },
            scale="auto",
            **apart,
        ),
        dict(
            title="Seconds per stage",
            y_title="seconds",
            series={s: column(f"time/{s}", "metrics") for s in STAGES},
            scale="auto",
            **apart,
        ),
        dict(
            title="Policy-version lag (mean, versions)",
            y_title="policy versions behind",
            series={"lag": column("version_lag")},
            zero_based=True,
        ),
        *version_specs(rows),
        dict(
            title="Actor restarts (cumulative)",
            y_title="restarts",
            series={
                kind: _cumulative(column(f"restarts/{kind}", "metrics")) for kind in ("rollout", "reward", "learner")
            },
            zero_based=True,
            integer=True,
        ),
        *eval_chart_specs(rows, metrics),  # held-out evaluation, when the run has one
    ]


def version_specs(rows: list[dict]) -> list[dict[str, Any]]:
    """With partial rollouts (rows resumed, or spanning versions): each iteration's oldest and newest
    first-token version, its newest last-token version, and the samples resumed."""
    if not any(row.get("resumed") or row.get("multi_version") for row in rows):
        return []

    def column(key: str) -> list[float | None]:
        return [row.get(key) for row in rows]

    return [
        dict(
            title="Policy versions of the samples (partial rollouts)",
            y_title="policy version",
            series={
                "first token, oldest": column("version_min"),
                "first token, newest": column("version_max"),
                "last token, newest": column("version_last_max"),
            },
            integer=True,
        ),
        dict(
            title="Samples resumed under newer weights",
            y_title="samples",
            series={"resumed": column("resumed")},
            zero_based=True,
            integer=True,
        ),
    ]


def series_with_prefix(rows: list[dict], prefix: str) -> dict[str, list[float | None]]:
    """Every figure whose key starts with `prefix`, one series each, named without the prefix."""
    keys = sorted({k for row in rows for k in row if k.startswith(prefix)})
    return {k[len(prefix) :]: [row.get(k) for row in rows] for k in keys}


def startup_iterations(run_dir: str | Path, x: list[int]) -> list[int]:
    """Each start's first iteration: its engines load and warm up inside it, so its stage times measure
    the start-up, not the steady state the other iterations show (a 15 s iteration 0 beside 0.2 s ones
    would flatten them). From the run's manifest; without one, the run's first iteration."""
    try:
        entries = read_manifest(run_dir).get("iterations", [])
    except (OSError, ValueError, KeyError):
        entries = []
    firsts: dict[Any, int] = {}
    for entry in entries:
        firsts.setdefault(entry.get("start"), entry.get("iteration"))
    found = sorted(i for i in firsts.values() if i in x)
    return found or x[:1]


def startup_note(rows: list[dict], metrics: dict[int, dict], startup: list[int]) -> dict[str, Any]:
    """The stage charts' keyword arguments for leaving the start-up iterations out, with the note saying so."""
    if not startup or len(startup) >= len(rows) or not metrics:
        return {}

    def seconds(i: int) -> str:
        value = metrics.get(i, {}).get("time/iteration")
        return f" ({_short(value)} s)" if _finite(value) else ""

    took = ", ".join(f"{i}{seconds(i)}" for i in startup)
    steady = _median([m.get("time/iteration") for i, m in metrics.items() if i not in startup])
    median = f", against a median {_short(steady)} s" if steady is not None else ""
    return dict(
        apart=startup,
        note=f"Start-up left out: iteration{'s' if len(startup) > 1 else ''} {took}{median}. "
        "Drawn apart in the start-up chart.",
    )


def value_ticks(
    values: list[Any], *, scale: str = "linear", zero_based: bool = False, integer: bool = False
) -> tuple[list[float], bool]:
    """An axis fitting `values`: its ticks (the first and last are its ends) and whether it is logarithmic.
    "auto" is logarithmic where the positive values span LOG_SPAN times or more and none is negative: a
    stage of milliseconds beside one of seconds otherwise draws as a flat line at 0."""
    finite = [float(v) for v in values if _finite(v)]
    positive = [v for v in finite if v > 0]
    if not finite:
        return nice_ticks(0.0, 1.0), False
    wide = bool(positive) and max(positive) >= LOG_SPAN * min(positive) and min(finite) >= 0
    if positive and (scale == "log" or (scale == "auto" and wide)):
        return log_ticks(min(positive), max(positive)), True
    low, high = min(finite), max(finite)
    if zero_based:
        low, high = min(low, 0.0), max(high, 0.0)
    return nice_ticks(low, high, integer=integer), False


def nice_ticks(low: float, high: float, *, most: int = 7, integer: bool = False) -> list[float]:
    """Round ticks from at or below `low` to at or above `high`, a step of 1, 2 or 5 times a power of ten,
    at most `most` of them: labels of few digits that a reader can count between. `integer`: no step
    below 1 (counts). A constant gets a band of 10% each side of it, or 0 to 1 for a constant 0."""
    low, high = min(low, high), max(low, high)
    if high == low:
        low, high = (low - abs(low) * 0.1, high + abs(high) * 0.1) if low else (0.0, 1.0)
    exponent = math.floor(math.log10((high - low) / max(most - 1, 1)))
    if integer:
        exponent = max(exponent, 0)
    for k in range(exponent, exponent + 3):
        for m in (1, 2, 5):
            step = m * 10.0**k
            first, last = math.floor(low / step + 1e-9), math.ceil(high / step - 1e-9)
            if last - first < most:
                return [round(n * step, max(0, -k)) + 0.0 for n in range(first, last + 1)]
    raise AssertionError("unreachable: a step of 100x the span takes two ticks")


def log_ticks(low: float, high: float, *, most: int = 7) -> list[float]:
    """Ticks of a log axis from at or below `low` to at or above `high` (both > 0): 1, 2 and 5 in each
    decade where they fit in `most`, else powers of ten, every n-th decade where there are many."""
    first = math.floor(math.log10(low) + 1e-9)
    last = max(math.ceil(math.log10(high) - 1e-9), first + 1)
    fine = [round(m * 10.0**k, max(0, -k)) for k in range(first, last + 1) for m in (1, 2, 5)]
    below = max(v for v in fine if v <= low * (1 + 1e-9))
    above = min(v for v in fine if v >= high * (1 - 1e-9) and v > below)
    fine = [v for v in fine if below <= v <= above]
    if len(fine) <= most:
        return fine
    decades = last - first
    every = math.ceil(decades / (most + 1))  # powers of ten are short labels: two more of them fit
    return [round(10.0**k, max(0, -k)) for k in range(first, first + every * math.ceil(decades / every) + 1, every)]


def tick_label(value: float) -> str:
    """A round tick as a person writes it: 0.05, 250, 2.5k, 1M, 1e-4."""
    if value == 0:
        return "0"
    for scale, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:.6g}{suffix}"
    if abs(value) < 1e-3:
        mantissa, exponent = f"{value:.6e}".split("e")
        return f"{float(mantissa):g}e{int(exponent)}"
    return f"{value:.6g}"


def _scaler(ticks: list[float], log: bool, start: float, end: float):
    """Value -> pixel along an axis whose ends are the first and last tick."""
    transform = math.log10 if log else float
    low, high = transform(ticks[0]), transform(ticks[-1])

    def to_px(value: float) -> float:
        return start + (end - start) * (transform(value) - low) / (high - low or 1.0)

    return to_px


def _axis_titles(width: int, height: int, left: int, bottom: int, x_title: str, y_title: str) -> list[str]:
    plot_middle = TOP + (height - TOP - bottom) / 2
    return [
        f'<text class="axis-title x" x="{left + (width - left - RIGHT) / 2:.1f}" y="{height - 6}" '
        f'text-anchor="middle">{html.escape(x_title)}</text>',
        f'<text class="axis-title y" x="12" y="{plot_middle:.1f}" text-anchor="middle" '
        f'transform="rotate(-90 12 {plot_middle:.1f})">{html.escape(y_title)}</text>',
    ]


def line_chart(
    title: str,
    x: list[int],
    series: dict[str, list[float | None]],
    *,
    y_title: str,
    x_title: str = "iteration",
    scale: str = "linear",
    zero_based: bool = False,
    integer: bool = False,
    apart: list[int] | tuple[int, ...] = (),
    note: str = "",
) -> str:
    """One figure: an SVG line per series over the iterations. The x axis runs from the first iteration to
    the last (every chart the same, to read one iteration across them), ticked at round iterations. The
    y axis fits the drawn values with round ticks (`value_ticks`: "linear", "log" or "auto");
    `zero_based` for counts and fractions, whose size is read from 0; iterations in `apart` are left out
    (the start-up, shown in its own chart) and `note` says so under the chart. On a log axis values of 0
    or below are gaps."""
    keep = [i not in apart for i in x]
    series = {name: [v if k else None for v, k in zip(values, keep)] for name, values in series.items()}
    finite = [v for values in series.values() for v in values if _finite(v)]
    caption = f"<figcaption>{html.escape(title)}</figcaption>"
    note_html = f'<p class="note">{html.escape(note)}</p>' if note else ""
    if not x or not finite:
        return f'<figure class="chart-box">{caption}<p class="empty">no data in this run</p>{note_html}</figure>'
    y_ticks, log = value_ticks(finite, scale=scale, zero_based=zero_based, integer=integer)
    first, last = x[0], x[-1]
    x_ticks = [t for t in nice_ticks(first, last, integer=True) if first <= t <= last]
    sx = _scaler([first, last] if last != first else [first - 1, first + 1], False, LEFT, WIDTH - RIGHT)
    sy = _scaler(y_ticks, log, HEIGHT - BOTTOM, TOP)

    def drawn(v: Any) -> bool:
        return _finite(v) and (v > 0 or not log)

    parts = [
        f'<svg class="chart line" viewBox="0 0 {WIDTH} {HEIGHT}" width="{WIDTH}" height="{HEIGHT}" '
        f'role="img" aria-label="{html.escape(title)}" data-scale="{"log" if log else "linear"}" '
        f'data-apart="{" ".join(map(str, apart))}">'
    ]
    for value in y_ticks:
        y = sy(value)
        parts.append(
            f'<line class="grid" x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{y:.1f}" y2="{y:.1f}"/>'
            f'<text class="tick y" x="{LEFT - 5}" y="{y + 3.5:.1f}" text-anchor="end">{tick_label(value)}</text>'
        )
    for value in x_ticks:
        parts.append(
            f'<line class="axis" x1="{sx(value):.1f}" x2="{sx(value):.1f}" y1="{HEIGHT - BOTTOM}" '
            f'y2="{HEIGHT - BOTTOM + 4}"/><text class="tick x" x="{sx(value):.1f}" y="{HEIGHT - BOTTOM + 15}" '
            f'text-anchor="middle">{tick_label(value)}</text>'
        )
    parts.append(f'<line class="axis" x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{HEIGHT - BOTTOM}" y2="{HEIGHT - BOTTOM}"/>')
    y_title = f"{y_title}, log scale" if log else y_title
    parts += _axis_titles(WIDTH, HEIGHT, LEFT, BOTTOM, x_title, y_title)
    legend = []
    for (name, values), colour in zip(series.items(), PALETTE * 4):
        points = [(i, v) for i, v in zip(x, values) if drawn(v)]
        if not points:
            if log and any(_finite(v) for v in values):
                legend.append(f'<span class="key none">{html.escape(name)}: 0, not on a log scale</span>')
            continue
        raw = np.array([v if drawn(v) else math.nan for v in values], dtype=float)
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
    return (
        f'<figure class="chart-box">{caption}{"".join(parts)}<div class="legend">{"".join(legend)}</div>'
        f"{note_html}</figure>"
    )


def startup_chart(x: list[int], metrics: dict[int, dict], startup: list[int]) -> str:
    """The start-up iterations' seconds per stage beside the steady iterations' median, as bars: what the
    stage charts leave out, and how much of a short run's time start-up is."""
    title = "Start-up: seconds per stage, against the steady iterations"
    steady = [i for i in x if i not in startup and i in metrics]
    groups = {
        f"iteration {i} (start-up)": [metrics[i].get(f"time/{s}") for s in TIME_STAGES] for i in startup if i in metrics
    }
    if groups and steady:
        groups[f"median of the {len(steady)} other iterations"] = [
            _median([metrics[i].get(f"time/{s}") for i in steady]) for s in TIME_STAGES
        ]
    if not groups or not steady:
        caption = f"<figcaption>{html.escape(title)}</figcaption>"
        return f'<figure class="chart-box">{caption}<p class="empty">no data in this run</p></figure>'
    names = [{"iteration": "whole iteration", "wall": "wall time"}.get(s, s) for s in TIME_STAGES]
    note = (
        "Wall time: seconds since the previous iteration's metrics; a start's first counts from the job's "
        "start, so it also holds the setup before the iteration (Ray, the actors, loading the model)."
    )
    return bar_chart(title, names, groups, x_title="seconds", y_title="stage", scale="auto", note=note)


def bar_chart(
    title: str,
    categories: list[str],
    groups: dict[str, list[float | None]],
    *,
    x_title: str,
    y_title: str,
    scale: str = "linear",
    note: str = "",
) -> str:
    """One figure of horizontal bars: a row per category, a bar per group in it, the value axis along the
    bottom with round ticks (`value_ticks`), each bar's value written at its end. On a log axis a bar of
    0 is no bar, its value still written."""
    values = [v for bars in groups.values() for v in bars if _finite(v)]
    ticks, log = value_ticks(values, scale=scale, zero_based=True)
    if log:  # the axis starts below the shortest bar, which would otherwise have no length
        ticks = log_ticks(min(v for v in values if v > 0) / 1.5, max(values))
    row = BAR_ROW * len(groups) + 8
    height = TOP + row * len(categories) + BOTTOM
    sx = _scaler(ticks, log, BAR_LEFT, WIDTH - BAR_RIGHT)
    parts = [
        f'<svg class="chart bars" viewBox="0 0 {WIDTH} {height}" width="{WIDTH}" height="{height}" role="img" '
        f'aria-label="{html.escape(title)}" data-scale="{"log" if log else "linear"}">'
    ]
    for value in ticks:
        parts.append(
            f'<line class="grid" x1="{sx(value):.1f}" x2="{sx(value):.1f}" y1="{TOP}" y2="{height - BOTTOM}"/>'
            f'<text class="tick x" x="{sx(value):.1f}" y="{height - BOTTOM + 15}" '
            f'text-anchor="middle">{tick_label(value)}</text>'
        )
    for r, category in enumerate(categories):
        top = TOP + r * row + 4
        parts.append(
            f'<text class="category" x="{BAR_LEFT - 5}" y="{top + row / 2:.1f}" '
            f'text-anchor="end">{html.escape(category)}</text>'
        )
        for g, ((name, bars), colour) in enumerate(zip(groups.items(), PALETTE * 4)):
            value = bars[r]
            if not _finite(value):
                continue
            y = top + g * BAR_ROW
            end = sx(value) if value > 0 or not log else BAR_LEFT
            parts.append(
                f'<rect class="bar" data-group="{html.escape(name)}" data-category="{html.escape(category)}" '
                f'x="{BAR_LEFT}" y="{y:.1f}" width="{max(end - BAR_LEFT, 0):.1f}" height="{BAR_ROW - 1}" '
                f'fill="{colour}"><title>{html.escape(name)}, {html.escape(category)}: {_short(value)}</title></rect>'
                f'<text class="value" x="{end + 3:.1f}" y="{y + BAR_ROW - 1.5:.1f}">{_short(value)}</text>'
            )
    parts.append(f'<line class="axis" x1="{BAR_LEFT}" x2="{BAR_LEFT}" y1="{TOP}" y2="{height - BOTTOM}"/>')
    parts += _axis_titles(WIDTH, height, BAR_LEFT, BOTTOM, f"{x_title}, log scale" if log else x_title, y_title)
    parts.append("</svg>")
    legend = "".join(
        f'<span class="key"><i style="background:{colour}"></i>{html.escape(name)}</span>'
        for name, colour in zip(groups, PALETTE * 4)
    )
    note_html = f'<p class="note">{html.escape(note)}</p>' if note else ""
    return (
        f'<figure class="chart-box"><figcaption>{html.escape(title)}</figcaption>{"".join(parts)}'
        f'<div class="legend">{legend}</div>{note_html}</figure>'
    )


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


def _median(values: list[Any]) -> float | None:
    finite = [v for v in values if _finite(v)]
    return float(np.median(finite)) if finite else None


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
  .legend {{ font-size: 12px; }}
  .key {{ margin-right: 12px; white-space: nowrap; }}
  .key i {{ display: inline-block; width: 10px; height: 10px; margin-right: 4px; border-radius: 2px; }}
  .tick {{ font-size: 10px; fill: #555; }}
  .axis {{ stroke: #999; }}
  .category {{ font-size: 10px; fill: #333; }}
  .axis-title {{ font-size: 11px; fill: #333; }}
  .value {{ font-size: 9px; fill: #444; }}
  .note {{ font-size: 12px; color: #555; margin: 4px 0 0; }}
  .key.none {{ color: #888; }}
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
