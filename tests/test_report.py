"""The run report's charts, without a run: every series drawn from its own points, gaps kept as gaps,
a long run smoothed, and text escaped. The page in a real browser is checked end to end (test_e2e)."""

import re

from rollout.report import _short, line_chart


def paths(svg: str) -> list[str]:
    return re.findall(r'<path class="series"[^>]* d="([^"]*)"', svg)


def test_each_series_is_one_path_through_its_finite_points_and_a_gap_starts_a_new_segment():
    svg = line_chart("Reward", [0, 1, 2, 3], {"reward": [0.1, None, 0.3, float("nan")], "kl": [1, 2, 3, 4]})
    reward, kl = paths(svg)
    assert reward.count("M") == 2 and reward.count("L") == 0  # two lone points: 0 and 2
    assert kl.count("M") == 1 and kl.count("L") == 3
    assert 'data-points="2"' in svg and 'data-points="4"' in svg
    assert svg.count("<circle") == 6 and "reward at iteration 2: 0.3" in svg


def test_a_long_run_draws_each_line_faint_under_its_moving_average():
    x = list(range(500))
    svg = line_chart("Reward", x, {"reward": [i % 7 / 7 for i in x]})
    assert len(paths(svg)) == 1 and svg.count('class="smoothed"') == 1 and "<circle" not in svg


def test_no_data_is_said_and_a_constant_gets_a_band_around_it():
    assert "no data in this run" in line_chart("KL coefficient", [0, 1], {"kl_coef": [None, None]})
    svg = line_chart("KL coefficient", [0, 1], {"kl_coef": [0.05, 0.05]})
    assert ">0.055<" in svg and ">0.045<" in svg


def test_names_are_escaped():
    svg = line_chart("<b>", [0], {"a<script>": [1.0]})
    assert "<script>" not in svg and "&lt;script&gt;" in svg and "&lt;b&gt;" in svg


def test_axis_labels_are_short():
    assert [_short(v) for v in (1_449_000.0, 12_345.0, 44.67, 0.05)] == ["1.449M", "12.35k", "44.67", "0.05"]
