"""The Python API (`import rollout`), called in-process: configs, errors, a run directory read back, and
(e2e) runs started from here, one stopped by its `on_iteration`, two in one process."""

import json
import shutil
import subprocess
import sys

import pytest
from e2e_common import ROOT, SMOKE
from test_replay import sample, synthetic_run, write_run

import rollout
from contracts.config import ConfigError, JobConfig
from contracts.errors import UserError
from rollout.cli import main

# -- import and config ---------------------------------------------------------------------------


def test_import_rollout_and_its_help_import_no_torch_or_ray():
    probe = (
        "import sys, contextlib, io, rollout\n"
        "heavy = lambda: sorted(m for m in ('torch', 'ray', 'vllm', 'transformers') if m in sys.modules)\n"
        "assert not heavy(), heavy()\n"
        "rollout.load_config; rollout.Run; rollout.open_run\n"
        "assert not heavy(), heavy()\n"
        "from rollout.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n"
        "    main(['--help'])\n"
        "assert not heavy(), heavy()\n"
    )
    subprocess.run([sys.executable, "-c", probe], cwd=ROOT, check=True, timeout=120)


def test_load_config_from_a_path_a_dict_or_a_jobconfig_with_dotted_overrides():
    from_path = rollout.load_config(SMOKE, {"iterations": 2, "learner.lr": 1e-4})
    assert (from_path.run_name, from_path.iterations, from_path.learner.lr) == ("tiny-arith-smoke", 2, 1e-4)
    from_dict = rollout.load_config({"iterations": 2, "learner": {"lr": 1e-4}})
    assert (from_dict.iterations, from_dict.learner.lr) == (2, 1e-4)
    again = rollout.load_config(from_path, {"seed": 7, "reward.rules": [{"name": "arithmetic", "weight": 0.5}]})
    assert (again.seed, again.iterations, again.reward.rules[0].weight) == (7, 2, 0.5)
    assert rollout.load_config(from_path) is from_path
    # values YAML would read otherwise stay what they are; --set's strings work too
    texts = rollout.load_config(None, {"run_name": "a: b", "rollout.sampling.stop": ["\n", "#"], "ray.address": None})
    assert (texts.run_name, texts.rollout.sampling.stop, texts.ray.address) == ("a: b", ["\n", "#"], None)
    assert rollout.load_config(None, ["iterations=3"]).iterations == 3
    assert isinstance(rollout.load_config(), JobConfig)


def test_a_bad_key_or_value_is_a_user_error_with_the_clis_message(capsys):
    with pytest.raises(UserError) as raised:
        rollout.load_config(SMOKE, {"learner.lrr": 1})
    assert isinstance(raised.value, ConfigError)
    assert main(["config", "--config", SMOKE, "--set", "learner.lrr=1"]) == 2
    assert capsys.readouterr().err.strip() == f"config error: {raised.value}"
    assert "learner.lrr: unknown key" in str(raised.value)
    with pytest.raises(ConfigError, match="iterations"):
        rollout.load_config({"iterations": 0})
    with pytest.raises(ConfigError, match="no such config file"):
        rollout.load_config(ROOT / "configs" / "nowhere.yaml")
    with pytest.raises(ConfigError, match="expected a YAML file's path"):
        rollout.load_config(3)
    with pytest.raises(UserError, match="learner.lrr: unknown key"):
        rollout.run({"learner": {"lrr": 1}}, out=ROOT / "runs" / "never-written")
    assert not (ROOT / "runs" / "never-written").exists()


def test_the_api_raises_no_system_exit_and_says_what_the_cli_says(tmp_path, capsys):
    with pytest.raises(UserError) as raised:
        rollout.replay(tmp_path / "nowhere", tmp_path / "out")
    assert main(["replay", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err.strip() == f"replay: {raised.value}"
    with pytest.raises(UserError, match="a URI; only `rollout run`"):
        rollout.generate(None, out="s3://bucket/gen")
    with pytest.raises(UserError, match="add train=True"):
        rollout.replay(tmp_path / "nowhere", tmp_path / "out", overrides={"learner.clip_eps_high": 0.3})


def test_replay_returns_the_replayed_run(tmp_path):
    run_dir, _ = synthetic_run(tmp_path / "run", iterations=2)
    replayed = rollout.replay(run_dir, tmp_path / "out", gamma=0.99, estimator="rloo")
    assert replayed.path == tmp_path / "out" and replayed.summary["rows"] == 24
    assert replayed.archive(columns=["advantages"]).num_rows == 24


# -- a run directory, read back ------------------------------------------------------------------


def metrics_line(iteration, **more):
    return json.dumps({"iteration": iteration, "reward_mean": 0.1 * iteration, **more}) + "\n"


def test_open_run_reads_metrics_eval_metrics_archives_and_checkpoints(tmp_path):
    run_dir, _ = synthetic_run(tmp_path / "run", iterations=3)
    (run_dir / "metrics.jsonl").write_text(
        metrics_line(0, **{"eval/pass@k": 0.25, "eval/reward_mean": 0.5})
        + metrics_line(1)
        + metrics_line(1, **{"time/wall": 2.0})  # a resume wrote iteration 1 again: the last line wins
        + metrics_line(2, **{"eval/pass@k": 0.5, "eval/reward_mean": 0.75})
        + '{"iteration": 3, "rew'  # a crash cut the last line
    )
    for name in ("iter-000001", "iter-000002", "iter-000003.partial"):
        (run_dir / "checkpoints" / name / "policy").mkdir(parents=True)
    (run_dir / "checkpoints" / "latest").write_text("iter-000002")
    run = rollout.open_run(run_dir)
    assert run.path == run_dir

    metrics = run.metrics
    assert metrics["iteration"].to_pylist() == [0, 1, 2]
    assert metrics["time/wall"].to_pylist() == [None, 2.0, None]
    assert metrics["reward_mean"].to_pylist() == pytest.approx([0.0, 0.1, 0.2])
    evals = run.eval_metrics
    assert evals.column_names == ["iteration", "eval/pass@k", "eval/reward_mean"]
    assert evals["iteration"].to_pylist() == [0, 2] and evals["eval/pass@k"].to_pylist() == [0.25, 0.5]

    whole = run.archive()
    assert whole.num_rows == 36 and "response_ids" in whole.column_names
    picked = run.archive(columns=["prompt_id", "reward"], iterations=[0, 2])
    assert picked.column_names == ["prompt_id", "reward"] and picked.num_rows == 24
    assert run.archive(columns=["iteration"], iterations=1)["iteration"].to_pylist() == [1] * 12
    assert run.archive(iterations=[7]).num_rows == 0
    with pytest.raises(UserError, match="no column nope"):
        run.archive(columns=["nope"])

    with pytest.raises(UserError, match="no eval archive"):
        run.eval_archive()
    write_run(tmp_path / "evals", [sample(it, f"p{i // 4}", i % 4, 3, 1.0) for it in (0, 2) for i in range(12)])
    shutil.copytree(tmp_path / "evals" / "rollouts", run_dir / "eval")
    assert run.eval_archive(columns=["iteration", "reward"]).num_rows == 24
    assert run.eval_archive(iterations=[2]).num_rows == 12

    assert [p.name for p in run.checkpoints] == ["iter-000001", "iter-000002"]
    assert run.latest_checkpoint == run_dir / "checkpoints" / "iter-000002"
    (run_dir / "checkpoints" / "latest").write_text("iter-000009")  # a dangling pointer: the newest whole one
    assert run.latest_checkpoint == run_dir / "checkpoints" / "iter-000002"


def test_open_run_refuses_what_is_not_a_run(tmp_path):
    with pytest.raises(UserError, match="no such run directory"):
        rollout.open_run(tmp_path / "nowhere")
    with pytest.raises(UserError, match="not a run directory"):
        rollout.open_run(tmp_path)
    (tmp_path / "config.yaml").write_text("iterations: 2\n")
    run = rollout.open_run(tmp_path)
    assert run.config.iterations == 2 and run.metrics.num_rows == 0 and run.checkpoints == []
    assert run.latest_checkpoint is None and run.eval_metrics.num_rows == 0


# -- runs started here (e2e) -------------------------------------------------------------------------

TINY = {"model.sft_warmup": False, "iterations": 2, "checkpoint_every": 5}


@pytest.fixture(scope="module")
def api_run(tmp_path_factory):
    """One short run started from here: 2 iterations, the checkpoint only after the last."""
    import ray

    out = tmp_path_factory.mktemp("api") / "run"
    seen = []
    run = rollout.run(SMOKE, out=out, overrides=TINY, on_iteration=seen.append)
    assert not ray.is_initialized()  # the Ray it started is stopped
    return run, seen


@pytest.mark.e2e
@pytest.mark.vllm
def test_run_returns_the_run_directory_read_back(api_run):
    run, seen = api_run
    assert [m["iteration"] for m in seen] == [0, 1]
    assert run.config.iterations == 2 and run.config.model.sft_warmup is False
    metrics = run.metrics
    assert metrics.num_rows == 2 and metrics["iteration"].to_pylist() == [0, 1]
    assert metrics["reward_mean"].to_pylist() == pytest.approx([m["reward_mean"] for m in seen])
    table = run.archive(columns=["iteration", "prompt_id", "reward", "advantages"], iterations=[1])
    assert table.num_rows == 16 * 2 and set(table["iteration"].to_pylist()) == {1}
    assert table["advantages"].null_count == 0
    assert [p.name for p in run.checkpoints] == ["iter-000001"]
    assert run.latest_checkpoint == run.path / "checkpoints" / "iter-000001"
    assert rollout.open_run(run.path).metrics.equals(metrics)


@pytest.mark.e2e
@pytest.mark.vllm
def test_on_iteration_returning_false_ends_the_run_as_finished_after_a_checkpoint(api_run, tmp_path):
    """A second run in the same process (the fixture's was the first); it stops after iteration 0 of 3."""
    import ray

    seen = []

    def first_only(metrics):
        seen.append(metrics["iteration"])
        return False

    run = rollout.run(SMOKE, out=tmp_path / "stopped", overrides={**TINY, "iterations": 3}, on_iteration=first_only)
    assert not ray.is_initialized()
    assert seen == [0]
    assert run.metrics["iteration"].to_pylist() == [0]
    assert set(run.archive(columns=["iteration"])["iteration"].to_pylist()) == {0}
    assert [p.name for p in run.checkpoints] == ["iter-000000"]
    assert run.latest_checkpoint == run.path / "checkpoints" / "iter-000000"
    manifest = json.loads((run.path / "manifest.json").read_text())
    assert [(it["iteration"], it["checkpoint"]) for it in manifest["iterations"]] == [(0, "iter-000000")]


@pytest.mark.e2e
@pytest.mark.vllm
def test_the_docs_script_runs_as_a_script(tmp_path):
    """docs/python-api.md's complete script, in a process of its own (a script's main thread), made short."""
    text = (ROOT / "docs" / "python-api.md").read_text()
    script = text.split("## A complete script", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    for old, new in (
        ('{"iterations": 8, "checkpoint_every": 4}', '{"iterations": 2, "model.sft_warmup": False}'),
        ('"runs/api-demo"', repr(str(tmp_path / "demo"))),
    ):
        assert old in script, old
        script = script.replace(old, new)
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=900, check=False
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "iteration 1: reward" in proc.stdout and "latest: " in proc.stdout
    assert (tmp_path / "demo" / "reward.png").stat().st_size > 0


@pytest.mark.e2e
@pytest.mark.vllm
def test_evaluate_the_latest_checkpoint_of_a_run(api_run, tmp_path):
    import ray

    run, _ = api_run
    result = rollout.evaluate(
        run.path, prompts="builtin:arith", overrides={"eval.max_prompts": 8}, out=tmp_path / "evaluated"
    )
    assert not ray.is_initialized()
    figures = result.summary
    assert 0 <= figures["eval/mean@k"] <= figures["eval/pass@k"] <= 1
    assert figures["eval/iteration"] == 1 and figures["eval/policy_version"] == 2
    assert result.eval_archive(columns=["prompt_id", "reward"]).num_rows == 8
    assert result.eval_metrics.num_rows == 1 and result.eval_metrics["eval/pass@k"][0].as_py() == figures["eval/pass@k"]
    with pytest.raises(UserError, match="give one of run, checkpoint or model"):
        rollout.evaluate(run.path, model="builtin:tiny-llama")


@pytest.mark.e2e
@pytest.mark.vllm
def test_a_ray_the_caller_connected_is_joined_and_left_running(tmp_path):
    import ray

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    try:
        result = rollout.evaluate(
            model="builtin:tiny-llama",
            config=SMOKE,
            prompts="builtin:arith",
            overrides={"eval.max_prompts": 4},
            out=tmp_path / "base",
        )
        assert ray.is_initialized()
        assert result.summary["eval/prompts"] == 4 and result.eval_archive().num_rows == 4
    finally:
        ray.shutdown()
