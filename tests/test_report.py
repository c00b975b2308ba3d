"""The run report's charts: every series drawn from its own points, gaps kept as gaps, a long run
smoothed, text escaped; round ticks, titled axes, a scale that fits each chart, the start-up apart.
The page of a hand-built run is read back in a real Chromium as a reader sees it; test_e2e renders a
real run's."""

import html
import math
import re
import shutil

import pytest

from rollout.offline.report import _short, line_chart, log_ticks, nice_ticks, tick_label, value_ticks


def paths(svg: str) -> list[str]:
    return re.findall(r'<path class="series"[^>]* d="([^"]*)"', svg)


def test_each_series_is_one_path_through_its_finite_points_and_a_gap_starts_a_new_segment():
    svg = line_chart(
        "Reward", [0, 1, 2, 3], {"reward": [0.1, None, 0.3, float("nan")], "kl": [1, 2, 3, 4]}, y_title="reward"
    )
    reward, kl = paths(svg)
    assert reward.count("M") == 2 and reward.count("L") == 0  # two lone points: 0 and 2
    assert kl.count("M") == 1 and kl.count("L") == 3
    assert 'data-points="2"' in svg and 'data-points="4"' in svg
    assert svg.count("<circle") == 6 and "reward at iteration 2: 0.3" in svg


def test_a_long_run_draws_each_line_faint_under_its_moving_average():
    x = list(range(500))
    svg = line_chart("Reward", x, {"reward": [i % 7 / 7 for i in x]}, y_title="reward")
    assert len(paths(svg)) == 1 and svg.count('class="smoothed"') == 1 and "<circle" not in svg


def test_no_data_is_said_and_a_constant_gets_a_band_around_it():
    assert "no data in this run" in line_chart("KL coefficient", [0, 1], {"kl_coef": [None, None]}, y_title="c")
    svg = line_chart("KL coefficient", [0, 1], {"kl_coef": [0.05, 0.05]}, y_title="c")
    assert y_ticks(svg) == ["0.044", "0.046", "0.048", "0.05", "0.052", "0.054", "0.056"]


def test_names_are_escaped():
    svg = line_chart("<b>", [0], {"a<script>": [1.0]}, y_title="<i>")
    assert "<script>" not in svg and "&lt;script&gt;" in svg and "&lt;b&gt;" in svg and "&lt;i&gt;" in svg


def test_axis_labels_are_short():
    assert [_short(v) for v in (1_449_000.0, 12_345.0, 44.67, 0.05)] == ["1.449M", "12.35k", "44.67", "0.05"]


def test_an_archive_with_no_metrics_or_learner_columns_still_gets_a_page(tmp_path):
    """A `rollout generate` archive: no metrics.jsonl, no KL. Those charts say so; the rest draw."""
    from test_stats import hand_records, write

    from rollout.offline.report import write_report

    run_dir = write(tmp_path / "run", hand_records(learner=False))
    assert write_report(run_dir, tmp_path / "page.html") == 2
    page = (tmp_path / "page.html").read_text()
    assert page.count("no data in this run") == 5  # KL, its coefficient, seconds per stage, restarts, start-up
    assert 'data-series="arithmetic"' in page and 'data-series="stop"' in page
    assert "Iteration 1, the first 2 samples." in page and "<script" not in page


def test_a_500_iteration_run_is_one_page_of_smoothed_lines(tmp_path):
    from test_stats import long_run

    from rollout.offline.report import write_report

    stats = long_run(tmp_path)
    assert write_report(stats.archive, tmp_path / "page.html", samples=3) == 500
    page = (tmp_path / "page.html").read_text()
    assert 'data-points="500"' in page and page.count('class="smoothed"') >= 5
    assert "Iteration 499, the first 3 samples." in page


def test_an_episodes_environment_turns_are_marked_in_its_trajectory(tmp_path, tiny_model_path):
    from test_stats import hand_records, write
    from transformers import AutoTokenizer

    from rollout.offline.report import trajectory, write_report

    assert trajectory([5, 6, 7, 8, 9], [1, 0, 0, 1, 0]) == [(False, [5]), (True, [6, 7]), (False, [8]), (True, [9])]
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path)
    call, result, answer = (
        tokenizer.encode(t, add_special_tokens=False) for t in ("<calc>2*3</calc>", "<result>6</result>", "6")
    )
    records = hand_records()
    episode = records[3]  # the last iteration's first sample
    episode.response_ids = call + result + answer
    episode.response_mask = [1] * len(call) + [0] * len(result) + [1] * len(answer)
    episode.response_logprobs = [-1.0] * len(episode.response_ids)
    for name in ("ref_logprobs", "values", "advantages", "returns", "token_rewards", "kl"):
        setattr(episode, name, [0.0] * len(episode.response_ids))
    write_report(write(tmp_path / "run", records, model=tiny_model_path), tmp_path / "page.html")
    page = (tmp_path / "page.html").read_text()
    expected = (
        f'<span class="model">{html.escape(tokenizer.decode(call))}</span>'
        f'<span class="env">{html.escape(tokenizer.decode(result))}</span>'
        f'<span class="model">{html.escape(tokenizer.decode(answer))}</span>'
    )
    assert expected in page and "the environment's turns" in page
    # without the model on this machine, the response is shown whole
    write_report(write(tmp_path / "elsewhere", records, model="/nowhere"), tmp_path / "plain.html")
    assert '<span class="env">' not in (tmp_path / "plain.html").read_text().split("<body>")[1]


def y_ticks(svg: str) -> list[str]:
    return re.findall(r'<text class="tick y"[^>]*>([^<]*)<', svg)


def value_of(label: str) -> float:
    """A tick label back to its number: 2.5k -> 2500, 1e-4 -> 0.0001."""
    scale = {"k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}.get(label[-1:], 1)
    return float(label[:-1] if scale != 1 else label) * scale


def is_round_axis(labels: list[str], log: bool) -> bool:
    """Log: every tick 1, 2 or 5 times a power of ten. Linear: evenly spaced by such a step, each tick a
    multiple of it."""
    values = [value_of(v) for v in labels]
    if len(values) < 2 or values != sorted(values):
        return False

    def one_two_five(v: float) -> bool:
        mantissa = v / 10 ** math.floor(math.log10(v))
        return any(math.isclose(mantissa, m, rel_tol=1e-9) for m in (1, 2, 5, 10))

    if log:
        return all(v > 0 and one_two_five(v) for v in values)
    step = values[1] - values[0]
    return (
        one_two_five(step)
        and all(math.isclose(b - a, step, rel_tol=1e-6) for a, b in zip(values, values[1:]))
        and all(math.isclose(v / step, round(v / step), abs_tol=1e-6) for v in values)
    )


@pytest.mark.parametrize(
    "low, high",
    [(0.4453, 0.918), (0.018, 0.022), (0, 29), (0, 499), (2.285, 2.633), (-0.3, 0.7), (16.34, 24.01e6), (3, 3), (0, 0)],
)
def test_nice_ticks_are_a_1_2_5_step_covering_the_range_in_at_most_seven(low, high):
    ticks = nice_ticks(low, high)
    assert ticks[0] <= low and ticks[-1] >= high and 2 <= len(ticks) <= 7
    assert is_round_axis([tick_label(t) for t in ticks], log=False)
    assert all(str(t) == str(round(t, 12)) for t in ticks)  # 0.3, not 0.30000000000000004


def test_nice_ticks_by_hand():
    assert nice_ticks(0.4453, 0.918) == [0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]
    assert nice_ticks(0, 29) == [0, 5, 10, 15, 20, 25, 30]
    assert nice_ticks(0, 2, integer=True) == [0, 1, 2] and nice_ticks(0, 2) == [0, 0.5, 1, 1.5, 2]
    assert nice_ticks(0, 0) == [0, 0.2, 0.4, 0.6, 0.8, 1.0]  # a constant 0: 0 to 1
    assert nice_ticks(0.1, 0.3) == [0.1, 0.15, 0.2, 0.25, 0.3]


def test_log_ticks_are_1_2_5_per_decade_where_they_fit_else_decades():
    assert log_ticks(1, 100) == [1, 2, 5, 10, 20, 50, 100]
    assert log_ticks(3, 40) == [2, 5, 10, 20, 50]
    assert log_ticks(7e-5, 38.4) == [1e-5, 1e-4, 0.001, 0.01, 0.1, 1, 10, 100]
    assert log_ticks(1, 1e12) == [1, 100, 1e4, 1e6, 1e8, 1e10, 1e12]
    assert log_ticks(5, 5) == [5, 10]


def test_tick_labels_are_written_as_a_person_writes_them():
    labels = [tick_label(v) for v in (0.0, 0.05, 250.0, 2500.0, 1e6, 1e-4, 2e-5, -0.2)]
    assert labels == ["0", "0.05", "250", "2.5k", "1M", "1e-4", "2e-5", "-0.2"]


def test_auto_is_a_log_axis_where_positive_values_span_1000_times():
    assert value_ticks([1e-4, 0.2, 1.0], scale="auto")[1] is True
    assert value_ticks([0.0, 1e-4, 0.2, 1.0], scale="auto")[1] is True  # a 0 is a gap on it
    assert value_ticks([0.002, 0.2, 1.0], scale="auto")[1] is False
    assert value_ticks([-1e-4, 0.2, 1.0], scale="auto")[1] is False  # a negative value can't be drawn on one
    assert value_ticks([1e-4, 0.2, 1.0], scale="linear") == ([0, 0.2, 0.4, 0.6, 0.8, 1.0], False)
    assert value_ticks([3, 5], zero_based=True, integer=True) == ([0, 1, 2, 3, 4, 5], False)


def test_iterations_apart_are_left_out_of_the_range_and_the_line_with_a_note():
    x = list(range(6))
    svg = line_chart(
        "Seconds", x, {"generate": [20.0, 0.2, 0.3, 0.2, 0.25, 0.2]}, y_title="seconds", apart=[0], note="N"
    )
    assert y_ticks(svg)[-1] == "0.3" and 'data-points="5"' in svg and 'data-apart="0"' in svg
    assert '<p class="note">N</p>' in svg and "iteration 0:" not in svg


def staged_run(tmp_path, iterations=8):
    """A run whose iteration 0 takes 100 times the generate seconds of the others (start-up) and whose
    stages span from 1e-4 s (archive) to 1 s (update) in the steady iterations."""

    from test_stats import record, write

    records = [
        record(i, i, [0.1] * (2 + i % 3), float(i % 2), {"arithmetic": float(i % 2), "format": 1.0}, "stop", i)
        for i in range(iterations)
    ]
    metrics = []
    for i in range(iterations):
        times = {
            "generate": 20.0 if i == 0 else 0.2 + 0.01 * i,
            "reward": 0.02,
            "values": 0.1,
            "advantages": 0.001,
            "update": 1.0 - 0.02 * i,
            "weight_sync": 0.01,
            "archive": 1e-4,
            "checkpoint": 0.5 if i % 3 == 2 else 0.0,
        }
        tokens = 2 + i % 3
        metrics.append(
            {
                "iteration": i,
                "tokens_per_s": tokens / times["generate"],
                "kl_coef": 0.1,
                **{f"time/{k}": v for k, v in times.items()},
                "time/iteration": sum(times.values()),
                "time/wall": sum(times.values()) + (60.0 if i == 0 else 0.01),
                **{f"restarts/{k}": int(i == 5 and k == "rollout") for k in ("rollout", "reward", "learner")},
            }
        )
    return write(tmp_path / "run", records, metrics)


READ_CHARTS = """() => [...document.querySelectorAll('figure.chart-box')].map(f => {
    const svg = f.querySelector('svg.chart');
    const box = e => { const r = e.getBoundingClientRect(); return [r.left, r.top, r.right, r.bottom]; };
    const texts = sel => [...svg.querySelectorAll(sel)].map(t => ({text: t.textContent, box: box(t)}));
    return {
        title: f.querySelector('figcaption').textContent,
        kind: svg.classList.contains('bars') ? 'bars' : 'line',
        scale: svg.dataset.scale,
        apart: svg.dataset.apart || '',
        xTitle: texts('text.axis-title.x'), yTitle: texts('text.axis-title.y'),
        xTicks: texts('text.tick.x'), yTicks: texts('text.tick.y'),
        grid: [...svg.querySelectorAll('line.grid')].map(l => [l.y1.baseVal.value, l.y2.baseVal.value]),
        series: [...svg.querySelectorAll('path.series')].map(p => {
            const b = p.getBBox(); return {name: p.dataset.series, points: Number(p.dataset.points),
                                            top: b.y, bottom: b.y + b.height}; }),
        bars: [...svg.querySelectorAll('rect.bar')].map(r => ({group: r.dataset.group,
            category: r.dataset.category, width: r.width.baseVal.value})),
        note: f.querySelector('p.note')?.textContent || '',
    };
})"""


def rendered_charts(page_path) -> list[dict]:
    """The page's charts as Chromium lays them out: titles, tick labels with their boxes on screen,
    each line's vertical extent, each bar."""
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.skip("Debian's chromium is not installed (`make tools` installs it where it runs as root)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport={"width": 1600, "height": 1000})
        problems = []
        page.on("console", lambda m: problems.append(m.text) if m.type in ("error", "warning") else None)
        page.goto(page_path.as_uri())
        charts = page.evaluate(READ_CHARTS)
        browser.close()
    assert problems == []
    return charts


def overlaps(a: list[float], b: list[float]) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def test_in_the_browser_every_axis_is_titled_with_round_ticks_and_each_scale_fits_its_chart(tmp_path):
    from rollout.offline.report import write_report

    run_dir = staged_run(tmp_path)
    assert write_report(run_dir, tmp_path / "page.html") == 8
    charts = {c["title"]: c for c in rendered_charts(tmp_path / "page.html")}
    assert len(charts) == 10
    for title, chart in charts.items():
        assert [t["text"] for t in chart["xTitle"]] and chart["xTitle"][0]["text"].strip(), title
        assert [t["text"] for t in chart["yTitle"]] and chart["yTitle"][0]["text"].strip(), title
        log = chart["scale"] == "log"
        assert ("log scale" in (chart["yTitle"] + chart["xTitle"])[0 if chart["kind"] == "line" else 1]["text"]) == log
        value_axis = chart["yTicks"] if chart["kind"] == "line" else chart["xTicks"]
        assert is_round_axis([t["text"] for t in value_axis], log), (title, value_axis)
        if chart["kind"] == "line":
            assert is_round_axis([t["text"] for t in chart["xTicks"]], False), (title, chart["xTicks"])
        labels = chart["xTicks"] + chart["yTicks"] + chart["xTitle"] + chart["yTitle"]
        for i, a in enumerate(labels):  # nothing written over anything else
            for b in labels[i + 1 :]:
                assert not overlaps(a["box"], b["box"]), (title, a, b)

    seconds = charts["Seconds per stage"]
    assert seconds["scale"] == "log" and seconds["apart"] == "0"  # 1e-4 s to 1 s; iteration 0 drawn apart
    top = value_of(seconds["yTicks"][-1]["text"])
    assert top < 20.0 and top <= 10 * 1.0  # the axis ends within a decade of the steady maximum, not at 20 s
    generate = next(s for s in seconds["series"] if s["name"] == "generate")
    assert generate["points"] == 7 and "Start-up left out: iteration 0" in seconds["note"]
    assert {s["name"]: s["points"] for s in seconds["series"]}["checkpoint"] == 2  # its 0 s are gaps on a log axis
    tokens = charts["Tokens/s per stage (generated tokens / the stage's seconds)"]
    assert tokens["scale"] == "log" and tokens["apart"] == "0"

    startup = charts["Start-up: seconds per stage, against the steady iterations"]
    bars = {(b["group"], b["category"]): b["width"] for b in startup["bars"]}
    assert bars[("iteration 0 (start-up)", "generate")] > bars[("median of the 7 other iterations", "generate")] > 0
    assert "wall time" in {b["category"] for b in startup["bars"]}

    for title in ("Reward (mean) and each component", "Response length (tokens)", "Actor restarts (cumulative)"):
        assert charts[title]["scale"] == "linear" and charts[title]["apart"] == "", title
    restarts = charts["Actor restarts (cumulative)"]
    assert [t["text"] for t in restarts["yTicks"]] == ["0", "1"]  # a count: whole numbers from 0
    finish = charts["Finish reasons (fraction of samples)"]
    assert finish["yTicks"][0]["text"] == "0" and value_of(finish["yTicks"][-1]["text"]) == 1


def test_a_linear_stage_chart_is_not_flattened_by_its_start_up(tmp_path):
    """Steady stages within 1000x of each other: a linear axis, and without iteration 0 the lines fill it."""
    import json

    from rollout.offline.report import write_report

    run_dir = staged_run(tmp_path)
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    for m in lines:
        m["time/archive"], m["time/advantages"], m["time/checkpoint"] = 0.01, 0.01, 0.01
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in lines))
    write_report(run_dir, tmp_path / "page.html")
    seconds = next(c for c in rendered_charts(tmp_path / "page.html") if c["title"] == "Seconds per stage")
    assert seconds["scale"] == "linear" and value_of(seconds["yTicks"][-1]["text"]) == 1.0
    grid = [y for line in seconds["grid"] for y in line]
    plot = max(grid) - min(grid)
    drawn = max(s["bottom"] for s in seconds["series"]) - min(s["top"] for s in seconds["series"])
    assert drawn > 0.8 * plot  # 0.01 s to 0.98 s across the plot, not squeezed under a 20 s point


def test_each_starts_first_iteration_is_start_up(tmp_path):
    """A resumed run loads its engines again: its first iteration after the resume is start-up too. Without
    a manifest, the run's first iteration."""
    import json

    from rollout.offline.report import startup_iterations

    run_dir = staged_run(tmp_path)
    x = list(range(8))
    assert startup_iterations(run_dir, x) == [0]
    entries = [{"iteration": i, "start": int(i >= 5)} for i in x]
    (run_dir / "manifest.json").write_text(json.dumps({"run_id": "hand", "starts": [], "iterations": entries}))
    assert startup_iterations(run_dir, x) == [0, 5]
    assert startup_iterations(run_dir, [5, 6, 7]) == [5]  # a run shown from iteration 5 on


def test_partial_rollouts_get_the_version_spread_and_resumed_charts(tmp_path):
    from test_stats import hand_records, partial_records, write

    from rollout.offline.report import write_report

    write_report(write(tmp_path / "run", partial_records()), tmp_path / "page.html")
    page = (tmp_path / "page.html").read_text()
    assert "Policy versions of the samples (partial rollouts)" in page and "Samples resumed under newer weights" in page
    assert 'data-series="last token, newest"' in page and 'data-series="resumed"' in page
    write_report(write(tmp_path / "plain", hand_records()), tmp_path / "plain.html")
    assert "partial rollouts" not in (tmp_path / "plain.html").read_text()
