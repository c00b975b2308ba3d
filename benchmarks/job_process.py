"""One `python -m rollout ...` as a user starts it, for the benchmarks that drive the whole job and the
end-to-end tests (tests/test_e2e*.py import it): in a process session of its own (so that Ray's workers, which stay in it, are found and
killed with it), its output in a log file, every wait on it bounded.

    with RolloutProcess(run_args(out, "iterations=14"), tmp_path / "run.log") as job:
        job.wait_for_iterations(out, 3)
        os.kill(job.actor_pid("RolloutActor"), signal.SIGKILL)
        assert job.wait(300) == 0, job.tail()
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "configs" / "tiny-arith-smoke.yaml"


def rollout_env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONUNBUFFERED": "1", **extra}


def rollout_cli(
    *args: str, timeout: float = 600, check: bool = True, env=None, **kwargs
) -> subprocess.CompletedProcess:
    """`python -m rollout ARGS` to its end; AssertionError with its last output if it fails and `check`."""
    proc = subprocess.run(
        [sys.executable, "-m", "rollout", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env or rollout_env(),
        **kwargs,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"rollout {' '.join(args)} exited {proc.returncode}:\n{proc.stderr[-4000:]}")
    return proc


def run_args(out: Path | str, *settings: str, config: Path | str = SMOKE) -> list[str]:
    """`run --config CONFIG --out OUT --set S ...`."""
    return ["run", "--config", str(config), "--out", str(out), *(a for s in settings for a in ("--set", s))]


class RolloutProcess:
    def __init__(
        self, args: list[str], log: Path, *, env: dict[str, str] | None = None, new_session: bool = True, stdin=None
    ):
        self.log = Path(log)
        self._log_file = self.log.open("w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "rollout", *args],
            cwd=ROOT,
            env=env or rollout_env(),
            stdin=stdin,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            start_new_session=new_session,
        )
        self.pid = self.proc.pid

    def __enter__(self) -> RolloutProcess:
        return self

    def __exit__(self, *exc) -> None:
        self.kill_session()

    def poll(self) -> int | None:
        return self.proc.poll()

    def wait(self, timeout: float) -> int:
        return self.proc.wait(timeout=timeout)

    def send_signal(self, signum: int) -> None:
        self.proc.send_signal(signum)

    def text(self) -> str:
        self._log_file.flush()
        return self.log.read_text(errors="replace")

    def tail(self, chars: int = 3000) -> str:
        return self.text()[-chars:]

    def wait_for(self, ready, what: str, timeout: float = 300.0) -> None:
        """Until `ready()`; AssertionError naming `what` if the process ends or `timeout` passes first."""
        deadline = time.monotonic() + timeout
        while not ready():
            if self.proc.poll() is not None:
                raise AssertionError(f"the run exited ({self.proc.poll()}) before {what}:\n{self.tail()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{what} did not happen within {timeout:.0f}s:\n{self.tail()}")
            time.sleep(0.2)

    def wait_for_iterations(self, out: Path, count: int, timeout: float = 300.0) -> None:
        """Until `out`'s metrics.jsonl holds `count` iterations."""
        self.wait_for(lambda: logged_iterations(out) >= count, f"iteration {count - 1} was logged", timeout)

    def wait_for_line(self, text: str, timeout: float = 300.0) -> None:
        self.wait_for(lambda: text in self.text(), f"{text!r} was printed", timeout)

    def session_pids(self, pattern: str) -> list[int]:
        """Processes of this run's session whose command line matches `pattern` (a pgrep pattern)."""
        found = subprocess.run(["pgrep", "-s", str(self.pid), "-f", pattern], capture_output=True, text=True)
        return [int(pid) for pid in found.stdout.split()]

    def actor_pid(self, kind: str) -> int:
        """The pid of the run's one `kind` actor (its class: RolloutActor, RewardActor, LearnerRank)."""
        pids = self.session_pids(f"ray::{kind}")
        assert len(pids) == 1, f"expected one {kind} process in session {self.pid}, found {pids}"
        return pids[0]

    def kill_session(self) -> None:
        """Everything the run started: the driver's group, and Ray's workers, which have groups of their own."""
        subprocess.run(["pkill", "-9", "-s", str(self.pid)], capture_output=True)
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self._log_file.close()


def logged_iterations(out: Path) -> int:
    metrics = Path(out) / "metrics.jsonl"
    return len(metrics.read_text().splitlines()) if metrics.exists() else 0
