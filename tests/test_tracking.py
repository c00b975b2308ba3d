"""Trackers on their own (no Ray): all three backends at once, a resume continuing their runs, a
backend that fails to start or never answers. Read back with each backend's own reader."""

import io
import json
import socket

import msgspec
import pyarrow as pa
import pytest
from tracker_readers import mlflow_run, tensorboard_scalars, wandb_offline

from contracts.config import ConfigError
from contracts.config.load import check, load_config, to_yaml
from rollout.driver.trackers import SampleTable, TrackedRun
from rollout.driver.tracking import Tracking, figures_of, sample_table

ALL = ["tracking.backends=[tensorboard,wandb,mlflow]", "tracking.wandb.mode=offline", "tracking.samples_every=2"]


def track(run_dir, iterations, overrides=ALL, timeout_s=None):
    run_dir.mkdir(exist_ok=True)
    cfg = load_config(None, [*overrides, *([f"tracking.timeout_s={timeout_s}"] if timeout_s else [])])
    run = TrackedRun(run_dir, "job-1", msgspec.to_builtins(cfg), to_yaml(cfg), {"start": 0})
    log = io.StringIO()
    tracking = Tracking(cfg.tracking, run, log)
    for i in iterations:
        metrics = {
            "iteration": i,
            "samples": 32,
            "reward_mean": 0.1 * i,
            "reward/arithmetic": 0.5,
            "time/generate": 1.0,
            "restarts/rollout": 0,
            "kl": float("nan"),
        }
        table = SampleTable(["prompt", "reward"], [["1+1=", 1.0]]) if tracking.wants_samples(i) else None
        tracking.log_iteration(metrics, table)
    tracking.close()
    return log.getvalue()


def test_three_backends_hold_every_figure_at_every_step_and_a_resume_continues_their_runs(tmp_path):
    assert track(tmp_path, range(0, 3)) == ""
    assert track(tmp_path, range(2, 5)) == ""  # iteration 2 again: a crash after it was logged
    figures = {"samples", "reward_mean", "reward/arithmetic", "time/generate", "restarts/rollout"}  # kl: NaN
    steps = [0, 1, 2, 3, 4]

    scalars, texts = tensorboard_scalars(tmp_path / "tensorboard")
    assert scalars == {name: steps for name in figures}
    assert texts["sample_table/text_summary"] == [0, 2, 4] and texts["config/text_summary"] == [0, 3]

    history, config = wandb_offline(tmp_path, "job-1")
    assert [row["_step"] for row in history] == steps
    assert all(figures <= row.keys() for row in history)
    assert [row["sample_table/nrows"] for row in history if "sample_table/nrows" in row] == [1, 1, 1]
    assert config["learner"]["lr"] == load_config().learner.lr and config["manifest"] == {"start": 0}

    state = json.loads((tmp_path / "tracking.json").read_text())
    run, metric_steps, artifacts, client = mlflow_run(state["mlflow"]["tracking_uri"], state["mlflow"]["run_id"])
    assert metric_steps == {name: steps for name in figures}
    assert float(run.data.params["learner.lr"]) == load_config().learner.lr and run.info.status == "FINISHED"
    assert {"config.yaml", "manifest.json", "sample_tables/iteration-000004.json"} <= set(artifacts)
    assert len(client.search_runs([run.info.experiment_id])) == 1
    assert {name: s["last_step"] for name, s in state.items()} == {"tensorboard": 4, "wandb": 4, "mlflow": 4}


def test_an_mlflow_sqlite_store_keeps_its_artifacts_beside_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # MLflow's own default would be ./mlruns here
    store = tmp_path / "stores" / "mlflow.db"
    assert (
        track(
            tmp_path / "run",
            range(1),
            ["tracking.backends=[mlflow]", f"tracking.mlflow.tracking_uri=sqlite:///{store}"],
        )
        == ""
    )
    assert (tmp_path / "stores" / "mlflow-artifacts").is_dir() and not (tmp_path / "mlruns").exists()


def test_a_backend_that_cannot_start_is_one_warning_and_the_others_go_on(tmp_path):
    (tmp_path / "a-file").write_text("")  # the store's directory would have to be inside a file
    log = track(
        tmp_path,
        range(3),
        [
            "tracking.backends=[mlflow,tensorboard]",
            f"tracking.mlflow.tracking_uri=sqlite:///{tmp_path}/a-file/mlflow.db",
        ],
    )
    [line] = log.splitlines()
    assert line.startswith("tracking: mlflow failed starting (") and "going on without it" in line
    scalars, _ = tensorboard_scalars(tmp_path / "tensorboard")
    assert scalars["reward_mean"] == [0, 1, 2]


def test_a_tracker_server_that_never_answers_holds_up_the_end_by_timeout_s_only(tmp_path):
    with socket.socket() as silent:  # accepts connections, never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        uri = f"http://127.0.0.1:{silent.getsockname()[1]}"
        log = track(
            tmp_path,
            range(2),
            ["tracking.backends=[tensorboard,mlflow]", f"tracking.mlflow.tracking_uri={uri}"],
            timeout_s=2,
        )
    assert log.splitlines() == [
        "tracking: mlflow did not finish starting within tracking.timeout_s (2s); "
        "leaving without it (metrics.jsonl has every figure)"
    ]


def test_no_backends_start_nothing(tmp_path):
    assert track(tmp_path, range(2), []) == ""
    assert list(tmp_path.iterdir()) == []


def test_backends_are_checked_at_load():
    with pytest.raises(ConfigError, match="tracking.backends.0"):
        load_config(None, ["tracking.backends=[tensorbored]"])
    with pytest.raises(ConfigError, match="tracking.backends: wandb named twice"):
        check(load_config(None, ["tracking.backends=[wandb,wandb]"]))


def test_figures_are_the_finite_numbers_without_the_step():
    assert figures_of({"iteration": 3, "a": 1, "b": float("inf"), "c": "text", "d": True, "e": 0.5}) == {
        "a": 1.0,
        "e": 0.5,
    }


def test_sample_table_joins_texts_and_reward_components():
    texts = pa.record_batch(
        {
            "prompt_id": ["p0", "p1"],
            "sample_index": [0, 1],
            "prompt": ["1+1=", "2+2="],
            "response": ["2", "5"],
            "finish_reason": ["stop", "length"],
        }
    )
    components = pa.StructArray.from_arrays([pa.array([1.0, float("nan")], pa.float32())], ["arithmetic"])
    rewards = pa.record_batch({"reward": pa.array([1.0, 0.0], pa.float32()), "reward_components": components})
    table = sample_table(texts, rewards, rows=5)
    assert table.columns == [
        "prompt_id",
        "sample_index",
        "prompt",
        "response",
        "finish_reason",
        "reward",
        "reward/arithmetic",
    ]
    assert table.rows == [["p0", 0, "1+1=", "2", "stop", 1.0, 1.0], ["p1", 1, "2+2=", "5", "length", 0.0, None]]
