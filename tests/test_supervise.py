"""`rollout run` as a parent and the job: an end the job reports is passed through untouched; an end it
could not report (SIGKILL, Ray ending a driver whose raylet died) gets one line and a non-zero exit."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def rollout_run(*args, **kwargs):
    return subprocess.Popen(
        [sys.executable, "-m", "rollout", "run", *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        **kwargs,
    )


def test_an_end_the_job_reports_is_its_own_line_and_exit_code(tmp_path):
    proc = rollout_run("--set", "learner.lr=inf", "--out", str(tmp_path / "run"))
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2
    assert err.splitlines() == ["config error: defaults + --set learner.lr=inf: learner.lr: must be a finite number"]


def test_a_job_killed_from_outside_gets_one_line_naming_how_and_exit_128_plus_the_signal(tmp_path):
    proc = rollout_run("--out", str(tmp_path / "run"), "--set", "data.builtin_size=64")
    try:
        job = _child(proc.pid)
        os.kill(job, signal.SIGKILL)
        _, err = proc.communicate(timeout=60)
    finally:
        subprocess.run(["pkill", "-9", "-s", str(proc.pid)], capture_output=True)
    assert proc.returncode == 128 + signal.SIGKILL
    assert err.splitlines()[-1].startswith(
        f"rollout run: the job's process ended before it could report (killed by SIGKILL, pid {job}); "
    )
    assert "the same command resumes from the newest checkpoint" in err


def test_the_job_runs_in_a_process_group_of_its_own_so_a_group_signal_reaches_it_once(tmp_path):
    proc = rollout_run("--out", str(tmp_path / "run"), "--set", "data.builtin_size=64")
    try:
        job = _child(proc.pid)
        assert os.getpgid(job) == job != os.getpgid(proc.pid) and os.getsid(job) == proc.pid
    finally:
        subprocess.run(["pkill", "-9", "-s", str(proc.pid)], capture_output=True)
        proc.communicate(timeout=60)


def _child(parent: int, timeout: float = 30.0) -> int:
    deadline = time.time() + timeout
    while time.time() < deadline:
        found = subprocess.run(["pgrep", "-P", str(parent)], capture_output=True, text=True).stdout.split()
        if found:
            return int(found[0])
        time.sleep(0.05)
    raise AssertionError(f"no job process under {parent}")


def test_a_stop_signal_that_lands_inside_a_c_call_is_still_a_stop():
    """A handler raising inside `ray.wait`'s Cython code comes out as that call's SystemError."""
    import signal

    from rollout.driver.stopping import JobStopped, stop_behind

    try:
        try:
            raise JobStopped(signal.SIGTERM)
        except JobStopped:
            raise SystemError("<cyfunction CoreWorker.wait> returned a result with an exception set")
    except SystemError as e:
        found = stop_behind(e)
    assert isinstance(found, JobStopped) and found.exit_code == 143
    assert stop_behind(SystemError("a real one")) is None
