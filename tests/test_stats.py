"""`rollout stats`: per-iteration figures of a hand-built archive, worked out by hand below."""

import datetime as dt
import json
import math

import numpy as np
import pytest

from contracts.schema import RolloutRecord
from rollout.archive import ArchiveWriter, read_table
from rollout.cli import main
from rollout.offline.replay import replay
from rollout.offline.stats import compute_stats
from rollout.offline.stats_view import format_comparison, format_table, plot_runs

T0 = dt.datetime(2026, 1, 1, 12, tzinfo=dt.timezone.utc)
NAN = float("nan")
KL_COEF = 0.1


def record(iteration, version, kl, reward, components, finish, seconds, learner=True):
    """One sample whose token rewards carry the per-token KL `kl` at coefficient KL_COEF."""
    rewards = [-KL_COEF * k for k in kl]
    if rewards:
        rewards[-1] += reward
    rec = RolloutRecord(
        run_id="hand",
        prompt_id=f"p{iteration}",
        iteration=iteration,
        policy_version=version,
        sample_index=0,
        prompt="1+1=",
        response="x" * len(kl),
        prompt_ids=[1],
        response_ids=[7] * len(kl),
        response_logprobs=[-1.0] * len(kl),
        finish_reason=finish,
        worker="rollout-0",
        generated_at=T0 + dt.timedelta(seconds=seconds),
        reward=reward,
        reward_components=components,
    )
    if learner:
        rec.ref_logprobs = rec.values = rec.advantages = rec.returns = [0.0] * len(kl)
        rec.token_rewards, rec.kl, rec.kl_coef = rewards, kl, KL_COEF
    return rec


def hand_records(learner=True):
    return [
        # iteration 0: KL 0.8, 0.4 and 0 (empty); tokens 5 over 2 s; versions 3, 2, 3 -> lag 1/3
        record(0, 3, [0.5, 0.3], 1.0, {"arithmetic": 1.0, "format": NAN}, "stop", 0, learner),
        record(0, 2, [0.1, 0.1, 0.2], 0.0, {"arithmetic": 0.0, "format": 1.0}, "length", 2, learner),
        record(0, 3, [], 0.5, {"arithmetic": 0.5, "format": NAN}, "error", 1, learner),
        # iteration 1: KL 1.0 each; both stamped at the same instant; format always failed
        record(1, 4, [0.25] * 4, 1.0, {"arithmetic": 1.0, "format": NAN}, "stop", 10, learner),
        record(1, 4, [0.25] * 4, 1.0, {"arithmetic": 1.0, "format": NAN}, "stop", 10, learner),
    ]


def write(run_dir, records, metrics=None, **metadata):
    meta = {"gamma": "1.0", "lam": "0.95", "kl_coef": repr(KL_COEF), "kl_estimator": "k1", "kl_target": "None"}
    with ArchiveWriter(run_dir / "rollouts", meta | metadata, ("arithmetic", "format"), batch_rows=2) as writer:
        writer.write(records)
    if metrics:
        (run_dir / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
    return run_dir


def test_per_iteration_figures(tmp_path):
    stats = compute_stats(write(tmp_path / "run", hand_records()))
    first, second = stats.iterations
    assert first["iteration"] == 0 and first["samples"] == 3 and first["tokens"] == 5
    assert first["tokens_per_s"] == pytest.approx(2.5)  # 5 tokens, first to last stamp 2 s
    assert first["reward_mean"] == pytest.approx(0.5)
    assert first["reward_std"] == pytest.approx(math.sqrt(0.5 / 3))
    assert first["reward/arithmetic"] == pytest.approx(0.5)
    assert first["reward/format"] == 1.0 and first["reward_failed/format"] == 2
    assert first["reward_failed/arithmetic"] == 0
    assert first["kl"] == pytest.approx((0.8 + 0.4 + 0.0) / 3, abs=1e-6)
    assert first["response_length_mean"] == pytest.approx(5 / 3)
    assert (first["finish/stop"], first["finish/length"], first["finish/error"]) == (1, 1, 1)
    assert first["version_lag"] == pytest.approx(1 / 3)

    assert second["tokens"] == 8 and second["tokens_per_s"] is None  # no time span to divide by
    assert math.isnan(second["reward/format"]) and second["reward_failed/format"] == 2
    assert second["kl"] == pytest.approx(1.0, abs=1e-6)
    assert second["version_lag"] == 0 and second["finish/stop"] == 2

    totals = stats.totals
    assert (totals["iterations"], totals["samples"], totals["tokens"]) == (2, 5, 13)
    assert totals["reward_mean"] == pytest.approx(0.7) and totals["reward_std"] == pytest.approx(0.4)
    assert totals["reward/arithmetic"] == pytest.approx(0.7)
    assert totals["reward/format"] == 1.0 and totals["reward_failed/format"] == 4
    assert totals["kl"] == pytest.approx((0.4 * 3 + 1.0 * 2) / 5, abs=1e-6)
    assert totals["response_length_mean"] == pytest.approx(2.6)
    assert (totals["finish/stop"], totals["finish/length"], totals["finish/error"]) == (3, 1, 1)
    assert totals["version_lag"] == pytest.approx(0.2)
    assert totals["tokens_per_s"] == pytest.approx(2.5)


def test_throughput_comes_from_the_runs_metrics_when_present(tmp_path):
    run = write(tmp_path / "run", hand_records(), metrics=[{"iteration": 1, "tokens_per_s": 100.0}])
    first, second = compute_stats(run).iterations
    assert first["tokens_per_s"] == pytest.approx(2.5) and second["tokens_per_s"] == 100.0
    assert compute_stats(run).totals["tokens_per_s"] == pytest.approx(13 / (2 + 0.08))
    # A replayed archive has no metrics of its own: its source run's are used.
    replay(run, tmp_path / "replayed")
    assert compute_stats(tmp_path / "replayed").iterations[1]["tokens_per_s"] == 100.0


def test_kl_is_null_without_learner_columns(tmp_path):
    stats = compute_stats(write(tmp_path / "run", hand_records(learner=False)))
    assert [s["kl"] for s in stats.iterations] == [None, None] and stats.totals["kl"] is None
    assert stats.iterations[0]["reward_mean"] == pytest.approx(0.5)


def test_kl_is_the_learners_whatever_the_logged_coefficient(tmp_path):
    """v2 archives carry the per-token KL: the coefficient an adaptive run logged does not enter it."""
    run = write(tmp_path / "run", hand_records(), metrics=[{"iteration": 0, "kl_coef": 0.2}], kl_target="6.0")
    first, second = compute_stats(run).iterations
    assert first["kl"] == pytest.approx(0.4, abs=1e-6) and second["kl"] == pytest.approx(1.0, abs=1e-6)


def test_table_and_comparison(tmp_path):
    a = compute_stats(write(tmp_path / "a", hand_records()))
    b = compute_stats(write(tmp_path / "b", hand_records()[:3]))
    text = format_table(a)
    table, summary = text.split("\n\n")
    table = table.splitlines()
    assert table[1].split()[:6] == ["iter", "samples", "tokens", "tok/s", "reward", "std"]
    assert "r/format" in table[1] and "fail/format" in table[1]
    assert table[-1].split()[0] == "all" and table[2].split()[:3] == ["0", "3", "5"]
    assert len({len(line) for line in table[1:]}) == 1  # aligned
    # The summary `rollout run` prints: reward 0.5 -> 1.0 over the two iterations.
    summary = summary.splitlines()
    assert summary[0] == "summary over 2 iterations (first fifth = 1 iterations):"
    assert summary[1].split()[:5] == ["reward_mean", "first", "0.500", "last", "1.000"]
    assert "first fifth 0.500 -> last fifth 1.000 (+0.500)" in summary[1]
    assert any(line.split()[0] == "reward/arithmetic" for line in summary[2:])
    both = format_comparison(a, b).splitlines()
    assert both[0].endswith("/a") and both[1].endswith("/b")
    header = both[2].split()
    assert header[:5] == ["iter", "samples", "A", "samples", "B"]
    iteration_1 = both[4].split()
    assert iteration_1[:3] == ["1", "2", "-"]  # run B has no iteration 1


def test_plot_writes_a_png(tmp_path):
    a = compute_stats(write(tmp_path / "a", hand_records()))
    b = compute_stats(write(tmp_path / "b", hand_records()[:3]))
    plot_runs([a, b], tmp_path / "both.png", labels=["a", "b"])
    assert (tmp_path / "both.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_stats(tmp_path, capsys):
    run = write(tmp_path / "run", hand_records())
    other = write(tmp_path / "other", hand_records(learner=False))
    assert main(["stats", str(run), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [s["samples"] for s in out["iterations"]] == [3, 2] and out["totals"]["samples"] == 5
    assert out["iterations"][1]["reward/format"] is None  # NaN becomes JSON null

    assert main(["stats", str(run / "rollouts"), "--plot", str(tmp_path / "p.png")]) == 0
    assert "all" in capsys.readouterr().out and (tmp_path / "p.png").stat().st_size > 1000

    assert main(["stats", str(run), "--compare", str(other), "--json", "--plot", str(tmp_path / "c.png")]) == 0
    runs = json.loads(capsys.readouterr().out)["runs"]
    assert [r["totals"]["kl"] is None for r in runs] == [False, True]
    assert (tmp_path / "c.png").exists()

    assert main(["stats", str(tmp_path / "missing")]) == 2
    assert "no archive here" in capsys.readouterr().err


def test_restarts_per_iteration_come_from_the_runs_metrics(tmp_path):
    run = write(
        tmp_path / "run",
        hand_records(),
        metrics=[
            {"iteration": 0, "restarts/rollout": 1, "restarts/reward": 0, "restarts/learner": 0},
            {"iteration": 1, "restarts/rollout": 0, "restarts/reward": 1, "restarts/learner": 1},
        ],
    )
    stats = compute_stats(run)
    assert [s["restarts"] for s in stats.iterations] == [1, 2] and stats.totals["restarts"] == 3
    header = format_table(stats).splitlines()[1].split()
    assert header[-1] == "restarts"
    # A run without any has no restarts column.
    calm = format_table(compute_stats(write(tmp_path / "calm", hand_records()))).splitlines()
    assert "restarts" not in calm[1]


def test_episodes_training_and_dynamic_sampling_get_their_columns(tmp_path):
    records = hand_records()
    # iteration 0's first sample: model 2 tokens, environment 2, model 1, environment 1 (the mask's runs of 0)
    records[0].response_ids, records[0].response_logprobs = [7] * 6, [-1.0] * 6
    records[0].response_mask, records[0].num_turns = [1, 1, 0, 0, 1, 0], 2
    records[0].env_error = "calculator: bad expression"
    records[1].response_mask, records[1].num_turns = [0, 1, 1], 2  # an environment turn first (a reset)
    for record in records:
        for name in ("ref_logprobs", "values", "advantages", "returns", "token_rewards", "kl"):
            setattr(record, name, [0.0] * len(record.response_ids))
    records[3].trained = False  # a group dynamic sampling left out
    metrics = [
        {"iteration": 0, "clip_frac": 0.2, "clip_frac_high": 0.05, "clip_frac_low": 0.15},
        {"iteration": 1, "clip_frac": 0.1, "clip_frac_high": 0.1, "clip_frac_low": 0.0}
        | {"dynamic_sampling/filtered_groups": 3, "dynamic_sampling/rounds": 2},
    ]
    stats = compute_stats(write(tmp_path / "run", records, metrics))
    first, second = stats.iterations
    assert (first["turns_mean"], first["env_turns_mean"], first["env_errors"]) == (pytest.approx(5 / 3), 1.0, 1)
    assert (second["trained"], second["env_turns_mean"], second["dynamic_sampling/rounds"]) == (1, 0.0, 2)
    assert first["dynamic_sampling/filtered_groups"] is None and first["clip_frac_low"] == 0.15
    totals = stats.totals
    assert (totals["trained"], totals["env_errors"], totals["env_turns_mean"]) == (4, 1, pytest.approx(3 / 5))
    assert (totals["clip_frac_high"], totals["dynamic_sampling/filtered_groups"]) == (pytest.approx(0.075), 3)
    header = format_table(stats).splitlines()[1].split()
    shown = ["trained", "turns", "env", "turns", "env", "err", "clip", "clip+", "clip-", "filtered", "rounds"]
    assert header[-11:] == shown  # ("env turns" and "env err" are two words each)
    # a plain run shows none of them
    plain = format_table(compute_stats(write(tmp_path / "plain", hand_records()))).splitlines()[1]
    assert not {"trained", "turns", "clip", "filtered"} & set(plain.split())


def long_run(tmp_path, iterations=500):
    """A run of `iterations` iterations of a 0/1 reward that rises from 0.3 to 0.8, four samples each."""
    records = []
    for i in range(iterations):
        rate = 0.3 + 0.5 * i / (iterations - 1)
        for k in range(4):
            reward = float((i * 7 + k * 3) % 10 < rate * 10)
            rec = record(i, i, [0.1], reward, {"arithmetic": reward, "format": 1.0}, "stop", i)
            rec.sample_index = k
            records.append(rec)
    return compute_stats(write(tmp_path / "long", records))


def test_a_long_table_keeps_its_last_rows_or_every_kth(tmp_path, capsys):
    run = long_run(tmp_path, 60)
    assert [s["iteration"] for s in run.shown(last=5)] == [55, 56, 57, 58, 59]
    assert [s["iteration"] for s in run.shown(every=20)] == [0, 20, 40, 59]
    assert [s["iteration"] for s in run.shown(last=10, every=4)] == [50, 54, 58, 59]
    assert main(["stats", str(tmp_path / "long"), "--last", "3"]) == 0
    rows = [line.split()[0] for line in capsys.readouterr().out.split("\n\n")[0].splitlines()[2:]]
    assert rows == ["57", "58", "59", "all"]
    assert main(["stats", str(tmp_path / "long"), "--every", "30", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [s["iteration"] for s in out["iterations"]] == [0, 30, 59] and out["totals"]["iterations"] == 60
    with pytest.raises(SystemExit):
        main(["stats", str(tmp_path / "long"), "--every", "0"])


def test_the_plot_smooths_a_long_run_and_its_band_stays_in_the_rewards_range(tmp_path):
    from rollout.offline.stats_view import smooth, smoothing_window

    assert smoothing_window(500) == 21 and smoothing_window(20) == 1 and smoothing_window(50) == 3
    assert smooth(np.array([1.0, 2.0, 3.0])).tolist() == [1.0, 2.0, 3.0]  # short runs are drawn as they are
    values = np.array([0.0, 1.0] * 50 + [np.nan])
    smoothed = smooth(values)
    assert np.all(np.abs(smoothed[2:-3] - 0.5) <= 0.1 + 1e-9) and np.isfinite(smoothed[-1])  # NaN skipped
    run = long_run(tmp_path)
    assert (run.totals["reward_min"], run.totals["reward_max"]) == (0.0, 1.0)
    figure = plot_runs([run], tmp_path / "long.png")
    from matplotlib.image import imread

    assert imread(tmp_path / "long.png").shape[1] > 900
    band = figure.axes[0].collections[0].get_paths()[0].vertices[:, 1]
    assert band.min() >= 0.0 and band.max() <= 1.0  # the reward's range, though mean + std passes 1 early on
    assert (np.array([s["reward_mean"] + s["reward_std"] for s in run.iterations]) > 1.0).any()
    line = figure.axes[0].lines[1].get_ydata()  # the smoothed reward: rising, and steadier than the raw means
    assert line[-25:].mean() - line[:25].mean() > 0.3
    raw = np.array([s["reward_mean"] for s in run.iterations])
    assert np.abs(np.diff(line)).mean() < 0.5 * np.abs(np.diff(raw)).mean()


def partial_records():
    """Partial rollouts: iteration 0 plain at version 0; iteration 1 holds a sample started under 0 and
    resumed under 1 at token 1 and under 2 at token 3, one started under 1 and resumed under 2, one fresh at 2."""
    records = [record(0, 0, [0.1], 1.0, {"arithmetic": 1.0, "format": 1.0}, "stop", 0)]
    for k, (version, at, versions) in enumerate([(0, [1, 3], [1, 2]), (1, [2], [2]), (2, [], [])]):
        rec = record(1, version, [0.1] * 4, 0.0, {"arithmetic": 0.0, "format": 1.0}, "stop", 5)
        rec.sample_index = k
        rec.resumed_at, rec.resumed_versions = at, versions
        rec.policy_version_last = versions[-1] if versions else version
        records.append(rec)
    return records


def test_partial_rollouts_show_each_iterations_version_spread_and_resumed_rows(tmp_path):
    stats = compute_stats(write(tmp_path / "run", partial_records()))
    first, second = stats.iterations
    assert (first["version_min"], first["version_max"], first["version_last_max"]) == (0, 0, 0)
    assert (first["resumed"], first["multi_version"], first["version_spread"]) == (0, 0, 0)
    assert (second["version_min"], second["version_max"], second["version_last_max"]) == (0, 2, 2)
    assert (second["resumed"], second["multi_version"], second["version_spread"]) == (2, 2, 2)
    totals = stats.totals
    assert (totals["resumed"], totals["version_min"], totals["version_last_max"], totals["version_spread"]) == (
        2,
        0,
        2,
        2,
    )
    lines = format_table(stats).splitlines()
    header = lines[1].split()
    assert header[-7:] == ["v", "min", "v", "max", "v", "last", "resumed"]  # "v min" etc. are two words each
    cells = dict(zip(["v min", "v max", "v last", "resumed"], lines[3].split()[-4:]))
    assert cells == {"v min": "0", "v max": "2", "v last": "2", "resumed": "2"}  # iteration 1's line
    # A run whose rows each have one version shows none of it.
    plain = format_table(compute_stats(write(tmp_path / "plain", hand_records()))).splitlines()[1]
    assert "resumed" not in plain.split() and "last" not in plain.split()
    shown = json.loads(json.dumps(stats.to_json()))
    assert shown["iterations"][1]["version_spread"] == 2 and shown["totals"]["resumed"] == 2


def test_replay_keeps_each_rows_versions_and_resumes(tmp_path):
    """A replayed archive is trained off-policy from each token's own behaviour logprob; the versions
    that sampled those tokens go with the rows, so its stats show the same spread."""
    run = write(tmp_path / "run", partial_records())
    replay(run, tmp_path / "replayed")
    columns = ["sample_index", "policy_version", "policy_version_last", "resumed_at", "resumed_versions"]
    assert read_table(tmp_path / "replayed", columns).to_pylist() == read_table(run, columns).to_pylist()
    assert compute_stats(tmp_path / "replayed").iterations == compute_stats(run).iterations
