"""The run report's charts, without a run: every series drawn from its own points, gaps kept as gaps,
a long run smoothed, and text escaped. The page in a real browser is checked end to end (test_e2e)."""

import html
import re

from rollout.offline.report import _short, line_chart


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


def test_an_archive_with_no_metrics_or_learner_columns_still_gets_a_page(tmp_path):
    """A `rollout generate` archive: no metrics.jsonl, no KL. Those charts say so; the rest draw."""
    from test_stats import hand_records, write

    from rollout.offline.report import write_report

    run_dir = write(tmp_path / "run", hand_records(learner=False))
    assert write_report(run_dir, tmp_path / "page.html") == 2
    page = (tmp_path / "page.html").read_text()
    assert page.count("no data in this run") == 4  # KL, its coefficient, seconds per stage, restarts
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
