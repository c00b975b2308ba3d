"""Faults a user or operator meets, without the cluster: the run-directory lock, a failing disk under
the archive writer, and command-line errors as one line with a documented exit code."""

import datetime as dt
import os
import time

import pytest

from rollout import archive as archive_module
from rollout.archive import ArchiveWriteError, ArchiveWriter
from rollout.cli import main
from rollout.record import RolloutRecord
from rollout.run_lock import RunDirBusy, RunLock


def record(i=0):
    return RolloutRecord(run_id="r", prompt_id=f"p{i}", iteration=0, policy_version=0, sample_index=0, prompt="1+1=",
                         response="2", prompt_ids=[1, 2], response_ids=[3, 4], response_logprobs=[-1.0, -2.0],
                         finish_reason="stop", worker="w", generated_at=dt.datetime.now(dt.timezone.utc))


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
    start = time.monotonic()
    writer.write([record(i) for i in range(8)])
    with pytest.raises(ArchiveWriteError, match=r"archive write to .*part-00000.arrow failed: .*No space left"):
        writer.flush()
    with pytest.raises(ArchiveWriteError):
        writer.write([record()])  # nothing more is accepted
    with pytest.raises(ArchiveWriteError):
        writer.close()  # the writer thread has ended: no wait on it
    assert time.monotonic() - start < 10 and not writer._thread.is_alive()


@pytest.mark.parametrize("argv, code, message", [
    (["config", "--set", "learner.lr=[1,"], 2, "--set learner.lr=[1,: the value is not valid YAML"),
    (["validate", "/nonexistent/prompts.jsonl", "--no-length-check"], 1, "/nonexistent/prompts.jsonl: no such file"),
    (["stats", "/nonexistent/run"], 2, "/nonexistent/run"),
])
def test_command_line_errors_are_one_line_with_their_exit_code(argv, code, message, capsys):
    assert main(argv) == code
    captured = capsys.readouterr()
    err = (captured.out + captured.err).strip()
    assert message in err and "Traceback" not in err and len(err.splitlines()) <= 2, err


def test_a_bad_prompt_file_is_one_line_and_exit_2(tmp_path, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    for prompts, message in ((empty, "no valid prompt records"), (tmp_path, "Is a directory"),
                             (tmp_path / "missing.jsonl", "No such file")):
        assert main(["run", "--set", f"data.prompts={prompts}", "--out", str(tmp_path / "run")]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("rollout run: ") and message in err and len(err.splitlines()) == 1, err
