"""Run `rollout run` in its own session and watch every process of it: the driver and each Ray actor.

Shared by `seed_scale.py` and `soak.py`. Memory is read from /proc: VmRSS now and VmHWM (the
kernel's peak RSS of the process, so no spike between two samples is missed), and RssAnon, the
process's private memory: VmRSS also counts the pages of Ray's shared object store a process has
touched, which grow as objects land at new places in the store without the process holding more. Each process is
named by its kind (driver, rollout, reward, learner; Ray's own daemons as `ray`) from its command
line, which Ray sets to `ray::CLASS.method` for actors.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from job_process import RolloutProcess, run_args

ROOT = Path(__file__).resolve().parents[1]
KINDS = {"RolloutActor": "rollout", "RewardActor": "reward", "LearnerRank": "learner"}


def memory_mb(pid: int) -> dict[str, int]:
    """VmRSS, VmHWM and RssAnon of `pid` in MB; {} once it is gone."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return {}
    out = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM", "RssAnon"):
            out[key] = int(value.split()[0]) / 1024
    return out


def mb_per_100(iterations, mb) -> float:
    """Least-squares slope of memory (MB) against iteration, per 100 iterations."""
    return round(float(np.polyfit(iterations, mb, 1)[0]) * 100, 2)


def _session_pids(session: int) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.getsid(int(entry.name)) == session:
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


def _kind(pid: int, started: int) -> str | None:
    """`started` is the pid the watcher started: `rollout run`'s parent (`rollout/driver/supervise.py`); the job it runs is
    the driver of the Ray job."""
    if pid == started:
        return "supervisor"
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return None
    if "-m rollout run" in cmd:
        return "driver"
    for cls, kind in KINDS.items():
        if f"ray::{cls}" in cmd:
            return kind
    return None  # Ray's daemons, idle workers: not the job's processes


@dataclass
class Watched:
    """What one run showed: per process, its kind, peak RSS and (iteration, RSS MB, private MB) samples."""

    returncode: int
    seconds: float
    kinds: dict[int, str] = field(default_factory=dict)
    peak_mb: dict[int, float] = field(default_factory=dict)
    samples: dict[int, list[tuple[int, float, float]]] = field(default_factory=dict)
    log: Path | None = None
    first_line_s: float | None = None  # seconds from the command's start to its first metrics line

    def startup_s(self, rows: list[dict]) -> float | None:
        """Start-up: from the command's start to the first iteration's start (±the sampling period)."""
        return None if self.first_line_s is None or not rows else round(self.first_line_s - rows[0]["time/wall"], 1)

    def peak_by_kind(self) -> dict[str, float]:
        """The largest peak RSS of each kind's processes (a restarted actor counts as another process)."""
        out: dict[str, float] = {}
        for pid, kind in self.kinds.items():
            out[kind] = round(max(out.get(kind, 0.0), self.peak_mb.get(pid, 0.0)), 1)
        return out


def metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def watch_run(
    out: Path, config: Path, settings: list[str], *, every_s: float = 1.0, timeout_s: float = 7200.0
) -> Watched:
    """`rollout run --config CONFIG --out OUT --set ...` to its end, sampling every process's memory."""
    log = out.with_suffix(".log")
    start = time.perf_counter()
    proc = RolloutProcess(run_args(out, *settings, config=config), log)
    watched = Watched(returncode=-1, seconds=0.0, log=log)
    lines = 0
    try:
        while proc.poll() is None:
            if time.perf_counter() - start > timeout_s:
                proc.kill_session()
                raise TimeoutError(f"{out}: the run took over {timeout_s:.0f}s (log: {log})")
            metrics_path = out / "metrics.jsonl"
            if metrics_path.exists():
                with metrics_path.open("rb") as f:
                    lines = sum(1 for _ in f)
                if lines and watched.first_line_s is None:
                    watched.first_line_s = time.perf_counter() - start
            for pid in _session_pids(proc.pid):
                if pid not in watched.kinds:
                    kind = _kind(pid, proc.pid)
                    if kind is None:
                        continue
                    watched.kinds[pid] = kind
                status = memory_mb(pid)
                if status:
                    watched.peak_mb[pid] = max(watched.peak_mb.get(pid, 0.0), status["VmHWM"])
                    watched.samples.setdefault(pid, []).append((lines, status["VmRSS"], status["RssAnon"]))
            time.sleep(every_s if lines else min(every_s, 0.2))  # the first line's time is the start-up's
    finally:
        if proc.poll() is None:
            proc.kill_session()
    watched.returncode = proc.wait(timeout=60)
    watched.seconds = time.perf_counter() - start
    return watched
