"""Faults a user or operator meets, without the cluster: the run-directory lock, a failing disk under
the archive writer, and command-line errors as one line with a documented exit code."""

import datetime as dt
import json
import os

import pytest

from contracts.schema import RolloutRecord
from rollout.archive import ArchiveWriteError, ArchiveWriter
from rollout.archive import writer as archive_module
from rollout.cli import main
from rollout.driver.run_lock import RunDirBusy, RunLock


def record(i=0):
    return RolloutRecord(
        run_id="r",
        prompt_id=f"p{i}",
        iteration=0,
        policy_version=0,
        sample_index=0,
        prompt="1+1=",
        response="2",
        prompt_ids=[1, 2],
        response_ids=[3, 4],
        response_logprobs=[-1.0, -2.0],
        finish_reason="stop",
        worker="w",
        generated_at=dt.datetime.now(dt.timezone.utc),
        reward=1.0,
        reward_components={"arithmetic": 1.0},
    )


def test_a_held_run_directory_is_refused_with_its_holder(tmp_path):
    lock = RunLock.acquire(tmp_path)
    with pytest.raises(RunDirBusy, match=rf"{tmp_path} is in use by pid {os.getpid()} on .*pass another --out"):
        RunLock.acquire(tmp_path)  # another open file description: flock says no, as to another process
    lock.release()
    again = RunLock.acquire(tmp_path)  # released: free, and nothing stale to report
    assert again.stale_warning() is None
    again.release()


def test_a_lock_left_by_a_dead_holder_is_taken_over_with_a_warning(tmp_path):
    (tmp_path / ".lock").write_text('{"host": "node-7", "pid": 4242, "command": "rollout run", "since": "then"}\n')
    lock = RunLock.acquire(tmp_path)  # the kernel released the dead holder's flock; its text remains
    assert "took over the lock" in lock.stale_warning() and "pid 4242 on node-7" in lock.stale_warning()
    lock.release()


def test_a_full_disk_fails_the_archive_writer_fast_and_close_does_not_hang(tmp_path, monkeypatch):
    # The next archive file is /dev/full: every write fails with ENOSPC, as on a full disk.
    os.symlink("/dev/full", tmp_path / "part-00000.arrow")
    monkeypatch.setattr(archive_module, "_next_file_index", lambda directory: 0)
    writer = ArchiveWriter(tmp_path, {}, ("arithmetic",), batch_rows=2)
    writer.write([record(i) for i in range(8)])
    with pytest.raises(ArchiveWriteError, match=r"archive write to .*part-00000.arrow failed: .*No space left"):
        writer.flush()
    with pytest.raises(ArchiveWriteError):
        writer.write([record()])  # nothing more is accepted
    with pytest.raises(ArchiveWriteError):
        writer.close()  # the writer thread has ended: no wait on it
    assert not writer._thread.is_alive()


@pytest.mark.parametrize(
    "argv, code, message",
    [
        (["config", "--set", "learner.lr=[1,"], 2, "--set learner.lr=[1,: the value is not valid YAML"),
        (
            ["validate", "/nonexistent/prompts.jsonl", "--no-length-check"],
            1,
            "/nonexistent/prompts.jsonl: no such file",
        ),
        (["stats", "/nonexistent/run"], 2, "/nonexistent/run"),
    ],
)
def test_command_line_errors_are_one_line_with_their_exit_code(argv, code, message, capfd):
    assert main(argv) == code
    captured = capfd.readouterr()
    err = (captured.out + captured.err).strip()
    assert message in err and "Traceback" not in err and len(err.splitlines()) <= 2, err


def test_a_bad_prompt_file_is_one_line_and_exit_2(tmp_path, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    for prompts, message in (
        (empty, "no valid prompt records"),
        (tmp_path, "a directory with no Parquet or Arrow files"),
        (tmp_path / "missing.jsonl", "No such file"),
    ):
        assert main(["run", "--set", f"data.prompts={prompts}", "--out", str(tmp_path / "run")]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("rollout run: ") and message in err and len(err.splitlines()) == 1, err


def long_prompt_file(tmp_path):
    path = tmp_path / "prompts.jsonl"
    good = [json.dumps({"prompt": f"{a}+{a}=", "completion": str(2 * a)}) for a in range(199)]
    path.write_text(
        "\n".join([*good[:150], json.dumps({"prompt": "9" * 100_000, "completion": "1"}), *good[150:]]) + "\n"
    )
    return path


def test_a_prompt_too_long_for_the_model_stops_the_run_at_load_before_ray_starts(tmp_path, capfd):
    prompts = long_prompt_file(tmp_path)
    assert main(["run", "--set", f"data.prompts={prompts}", "--out", str(tmp_path / "run")]) == 2
    err = capfd.readouterr().err
    assert f"{prompts}:151: prompt is" in err and "longer than the maximum 1024" in err
    assert "1 prompt(s) longer than model.max_prompt_tokens" in err.splitlines()[-1]
    import ray

    assert not ray.is_initialized() and not (tmp_path / "run").exists()


def test_prompts_too_long_are_skipped_when_the_config_says_so(tmp_path, tiny_model_path, capsys):
    import sys

    from transformers import AutoTokenizer

    from contracts.config import DataConfig
    from contracts.rendering import PromptRenderer, render_prompts
    from rollout.driver.prompts import load_prompts

    prompts = long_prompt_file(tmp_path)
    data = DataConfig(prompts=str(prompts), on_bad_record="skip")
    renderer = PromptRenderer(AutoTokenizer.from_pretrained(tiny_model_path), 32)
    records, tasks = render_prompts(
        load_prompts(data, 0, log=sys.stderr), renderer, on_bad_record="skip", source=str(prompts), log=sys.stderr
    )
    assert len(records) == 199 and set(tasks) == {r.prompt_id for r in records}
    assert "skipped 1 prompt(s) longer than model.max_prompt_tokens" in capsys.readouterr().err


def test_a_missing_reward_model_fails_before_any_actor_starts(tmp_path, capfd):
    import ray

    assert main(["run", "--set", f"reward.model.path={tmp_path / 'no-rm'}", "--out", str(tmp_path / "run")]) == 2
    err = capfd.readouterr().err.strip()
    assert f"reward.model.path: {tmp_path / 'no-rm'} does not exist" in err and len(err.splitlines()) == 1, err
    assert not ray.is_initialized() and not (tmp_path / "run").exists()


def test_a_causal_lm_as_reward_model_is_refused_before_ray_starts(tmp_path, tiny_model_path, capfd):
    assert main(["run", "--set", f"reward.model.path={tiny_model_path}", "--out", str(tmp_path / "run")]) == 2
    err = capfd.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "holds LlamaForCausalLM" in err and "not a reward model" in err, err
    assert not (tmp_path / "run").exists()


def test_more_prompts_per_iteration_than_the_data_holds_is_one_line_and_leaves_no_run_directory(tmp_path, capfd):
    import ray

    out = tmp_path / "run"
    assert (
        main(["run", "--set", "data.builtin_size=50", "--set", "rollout.prompts_per_iteration=64", "--out", str(out)])
        == 2
    )
    err = capfd.readouterr().err.strip().splitlines()
    assert err == [
        "config error: rollout.prompts_per_iteration (64) exceeds the 50 usable prompts of data.prompts "
        "(builtin:arith): lower it, or give more prompts"
    ], err
    assert not out.exists() and not ray.is_initialized()


def test_a_corrupt_archive_is_reported_with_its_file_and_batch_and_replay_leaves_nothing(tmp_path, capfd):
    from rollout.archive import archive_files

    run = tmp_path / "run"
    with ArchiveWriter(run / "rollouts", {"gamma": "1.0", "lam": "0.95"}, ("arithmetic",), batch_rows=4) as writer:
        writer.write([record(i) for i in range(64)])
    [path] = archive_files(run)
    data = bytearray(path.read_bytes())
    rng = __import__("random").Random(0)
    middle = len(data) // 2
    data[middle : middle + 4096] = bytes(rng.randrange(256) for _ in range(min(4096, len(data) - middle - 8)))[:4096]
    path.write_bytes(bytes(data))
    assert main(["stats", str(run)]) == 2
    err = capfd.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"rollout stats: {path}: record batch ") and "corrupt" in err[-1], err
    assert main(["replay", str(run), "--out", str(tmp_path / "out"), "--estimator", "reinforce_pp"]) == 2
    assert "corrupt" in capfd.readouterr().err
    assert not any((tmp_path / "out").glob("rollouts*/part-*.arrow"))  # no partial output archive


def test_greedy_sampling_with_several_samples_is_refused_at_load(tmp_path, capfd):
    import ray

    out = tmp_path / "run"
    assert (
        main(["run", "--set", "rollout.sampling.temperature=0", "--set", "rollout.n_samples=4", "--out", str(out)]) == 2
    )
    err = capfd.readouterr().err
    assert "rollout.sampling.temperature 0 is greedy decoding" in err and "rollout.n_samples is 4" in err
    assert not out.exists() and not ray.is_initialized()


def test_an_actor_that_fails_in_its_own_start_up_is_named_with_its_first_error():
    """The member keeps its start-up error and raises it, by type, from `ready()`: the group names it and
    the error, with nothing read out of Ray's text."""
    import ray

    from contracts.config import RewardConfig, RewardModelConfig
    from rollout.actors.reward_workers import RewardWorkers
    from rollout.errors import exit_code, one_line
    from rollout.runtime.failures import ActorStartError

    cfg = RewardConfig(model=RewardModelConfig(path="/x", batch_size=0))  # past the config's own checks
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        group = RewardWorkers(cfg, start_timeout_s=60)
        with pytest.raises(ActorStartError) as raised:
            group.wait_started()
    finally:
        ray.shutdown()
    assert one_line(raised.value) == (
        "reward-0 failed in its start-up: ValueError: batch_size must be >= 1, got 0; its log is under RUN_DIR/logs"
    )
    assert exit_code(raised.value) == 1


def test_an_object_store_out_is_refused_where_it_is_not_supported_and_a_missing_bucket_is_one_line(
    tmp_path, monkeypatch, capsys, s3_server
):
    monkeypatch.chdir(tmp_path)
    assert main(["generate", "--prompts", "p.jsonl", "--out", "s3://bucket/run"]) == 2
    assert (
        "--out s3://bucket/run: a URI; only `rollout run` keeps its run on an object store" in capsys.readouterr().err
    )
    assert list(tmp_path.iterdir()) == []
    for name, value in s3_server.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("ROLLOUT_CACHE", str(tmp_path / "cache"))
    assert main(["run", "--out", "s3://no-such-bucket/run"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "rollout run: --out s3://no-such-bucket/run: no-such-bucket does not exist or cannot be listed with these "
        "credentials (AWS_ACCESS_KEY_ID, AWS_ENDPOINT_URL, ...): create it, or pass another --out"
    ]
    assert list(tmp_path.iterdir()) == []  # nothing staged either
