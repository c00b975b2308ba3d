"""End to end at the command line: `rollout generate`, `ray job submit`, and a run on a terminal."""

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.compute as pc
import pytest
from e2e_common import LEARNER_COLUMNS, ROOT, SMOKE, free_port
from job_process import rollout_cli, rollout_env  # noqa: E402

from rollout.archive import read_table

pytestmark = [pytest.mark.e2e, pytest.mark.vllm]


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


def test_ray_job_submit_fails_fast_on_a_small_head_then_runs_with_the_suggested_change(tmp_path):
    """A 2-CPU head cannot hold the smoke job's 2.5 CPUs: the job says so within seconds, exit 2;
    with one of the settings the message names lowered, the same submit runs."""
    ray_bin = Path(sys.executable).with_name("ray")
    env = rollout_env()
    # Ray >= 2.52 turns on token auth for `ray start`; the client sends the token it wrote to
    # ~/.ray/auth_token only when told to (docs/cluster.md, "Token authentication").
    env["RAY_AUTH_MODE"] = "token"
    env["PATH"] = f"{ray_bin.parent}{os.pathsep}{env.get('PATH', '')}"
    dashboard = free_port()
    port = free_port()
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
