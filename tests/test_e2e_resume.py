"""End to end: runs killed, crashed, stopped and resumed; learner ranks and staleness; nothing archived twice."""

import json
import re
import shutil
import signal
from pathlib import Path

import pytest
from e2e_common import SMOKE, assert_gae_consistent, keys
from job_process import RolloutProcess, rollout_cli, run_args  # noqa: E402

from rollout.archive import read_table

pytestmark = [pytest.mark.e2e, pytest.mark.vllm]


def run_and_kill(out, *settings, after_iterations):
    """`rollout run` of 30 smoke iterations, SIGKILLed (with its Ray) once it has logged `after_iterations`."""
    with RolloutProcess(run_args(out, "iterations=30", *settings), out.with_suffix(".log")) as job:
        job.wait_for_iterations(out, after_iterations)


@pytest.fixture(scope="module")
def killed_once(tmp_path_factory):
    """One run SIGKILLed once 4 iterations are logged, its checkpoints every 3: what it archived after its
    newest checkpoint a resume redoes and must not archive twice. Each test resumes a copy of it, so the
    two pay for one killed start, not one each."""
    out = tmp_path_factory.mktemp("killed") / "run"
    run_and_kill(out, "checkpoint_every=3", after_iterations=4)
    return out


def copy_of(run, to):
    shutil.copytree(run, to)
    return to


def test_a_killed_run_resumes_without_duplicates(killed_once, tmp_path):
    out = copy_of(killed_once, tmp_path / "killed")
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


def test_two_crashes_and_two_resumes_end_with_exactly_the_configured_updates(killed_once, tmp_path):
    out = copy_of(killed_once, tmp_path / "crashy")  # the first crash
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
