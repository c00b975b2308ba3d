"""End to end, faults: a full disk, actors lost, killed or stopped mid-run, the raylet gone."""

import json
import os
import signal
import subprocess
import sys

import pyarrow.compute as pc
import pytest
from e2e_common import SMOKE, keys
from job_process import RolloutProcess, logged_iterations, rollout_cli, run_args  # noqa: E402

from rollout.archive import read_table

pytestmark = [pytest.mark.e2e, pytest.mark.vllm]


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
        # Whichever file the disk filled on (the archive's part, the manifest, the metrics), the line names it.
        assert "No space left on device" in line and str(disk / "run") in line, proc.stderr[-2000:]
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
            session.checkpoints.commit_written(session.learner, wait=True)  # iteration 1's checkpoint whole first
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
