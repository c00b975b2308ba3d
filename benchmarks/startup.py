"""Start-up of `rollout run`: the process wall of the job as a user starts it, and the time to its first
iteration broken down by stage, as JSON.

    .venv/bin/python benchmarks/startup.py --runs 2                  # both kinds of run, taking turns
    .venv/bin/python benchmarks/startup.py --runs 2 --mode plain     # only the process wall

Each run is `python -m rollout run --config configs/tiny-arith.yaml --set iterations=6 --set
model.sft_warmup=false` into a fresh directory. A `plain` run is exactly that command, timed from outside
(`process_wall_s`). A `stages` run is the same job in a process that wraps the start-up steps the driver
takes (`Session.open`'s calls) with timers before it calls the CLI, and watches each actor group's
`ready()` from a thread, so an engine that is up while the learner still builds is seen when it is up.

Stages, in seconds (`stages`, each from the end of the one before, in the order the driver takes them):
  python_imports           interpreter start and the driver's imports, up to `run_job` (no torch: the data's
                           thread imports it while Ray starts)
  read_data_and_ray_start  config checks, tokenizer and prompts, and `ray.init` (at the same time, where the
                           job reads its data while Ray starts; `durations` has each one's own seconds)
  run_record               run directory locked, manifest
  ray_start                config.yaml, Ray (when it is not up yet), devices and the fit check
  start_model              the builtin model (cached after the first run), SFT warm-up when asked
  actors_spawned           rollout and reward workers asked for (they build in their own processes)
  learner                  the learner ranks placed and their models built (waited on)
  rollout_workers          what was left of the engines' start once the learner was built
  reward_workers           the same for the reward workers
  weight_sync              the weight sync between the learner and the engines set up
  collector                prompt sampler, collector, manifest start, archive and trackers opened
  first_iteration          generation, reward, learning, weight sync of iteration 0
  rest                     the other iterations
  close                    the checkpoint's write committed, the run's files closed, actors released
  exit                     the process's end after that (Ray's shutdown)
  until_first_iteration    the sum of the stages before `first_iteration`
`ready`: seconds since the process started when each group's members were all up. `durations`: the
seconds of `read_data` and of `init_ray` themselves.

Each line: {"run", "mode", "process_wall_s", "stages", "ready", "durations"}; then one line of medians.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "tiny-arith.yaml"
SETTINGS = ("iterations=6", "model.sft_warmup=false")
SPAWNED_AT_ENV = "STARTUP_BENCH_SPAWNED_AT"  # the parent's clock when it started the stages run


def job_args(out: Path, settings: list[str]) -> list[str]:
    return ["run", "--config", str(CONFIG), "--out", str(out), *(a for s in settings for a in ("--set", s))]


def run_plain(out: Path, settings: list[str], timeout_s: float) -> dict:
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "rollout", *job_args(out, settings)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )
    wall = time.perf_counter() - start
    if proc.returncode:
        raise SystemExit(f"the job exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    return {"process_wall_s": round(wall, 2), "iterations_s": _iteration_seconds(out)}


def run_stages(out: Path, settings: list[str], timeout_s: float) -> dict:
    report = out.parent / f"{out.name}.stages.json"
    start = time.time()
    proc = subprocess.run(
        [sys.executable, __file__, "--child", str(report), *job_args(out, settings)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        env={**os.environ, SPAWNED_AT_ENV: repr(start)},
    )
    wall = time.time() - start
    if proc.returncode:
        raise SystemExit(f"the job exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    result = json.loads(report.read_text())
    stages = result["stages"]
    stages["exit"] = round(wall - sum(v for k, v in stages.items() if k != "until_first_iteration"), 2)
    return {"process_wall_s": round(wall, 2), **result}


def _iteration_seconds(out: Path) -> list[float]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [round(json.loads(line)["time/iteration"], 2) for line in lines]


# -- the stages run's own process ---------------------------------------------------------------------


class Timeline:
    """Marks (name -> seconds since the process was spawned), in the order they were made."""

    def __init__(self, spawned_at: float):
        self.spawned_at = spawned_at
        self.marks: dict[str, float] = {}
        self.ready: dict[str, float] = {}
        self.durations: dict[str, float] = {}

    def now(self) -> float:
        return time.time() - self.spawned_at

    def mark(self, name: str) -> None:
        self.marks.setdefault(name, self.now())

    def after(self, owner, attribute: str, name: str) -> None:
        """Mark `name` when `owner.attribute` (a function) returns, the first time."""
        original = getattr(owner, attribute)
        timeline = self

        def timed(*args, **kwargs):
            result = original(*args, **kwargs)
            timeline.mark(name)
            return result

        setattr(owner, attribute, timed)

    def duration(self, owner, attribute: str, name: str) -> None:
        """The seconds of the first call of `owner.attribute`, in `durations` (it may overlap others)."""
        original = getattr(owner, attribute)
        timeline = self

        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                timeline.durations.setdefault(name, round(time.perf_counter() - start, 2))

        setattr(owner, attribute, timed)

    def before(self, owner, attribute: str, name: str) -> None:
        """Mark `name` when `owner.attribute` is first called."""
        original = getattr(owner, attribute)
        timeline = self

        def timed(*args, **kwargs):
            timeline.mark(name)
            return original(*args, **kwargs)

        setattr(owner, attribute, timed)

    def watch_ready(self, group: str, refs: list) -> None:
        """When every ref in `refs` (members' `ready()`) is done, in a thread of its own."""
        import ray

        def wait():
            ray.wait(refs, num_returns=len(refs), timeout=600)
            self.ready.setdefault(group, round(self.now(), 2))

        threading.Thread(target=wait, daemon=True, name=f"ready {group}").start()

    def stages(self) -> dict[str, float]:
        out, last = {}, 0.0
        for name, at in self.marks.items():
            out[name] = round(at - last, 2)
            last = at
        out["until_first_iteration"] = round(self.marks["collector"], 2)
        return out


def child(report: Path, argv: list[str]) -> int:
    timeline = Timeline(float(os.environ[SPAWNED_AT_ENV]))
    from rollout.actors import learner_ranks, reward_workers, rollout_workers
    from rollout.driver import job, session, startup
    from rollout.weight_sync import sync

    timeline.before(job, "run_job", "python_imports")
    if hasattr(session, "read_data_starting_ray"):  # the data read while Ray starts
        timeline.after(session, "read_data_starting_ray", "read_data_and_ray_start")
    else:
        timeline.after(session, "read_data", "read_data_and_ray_start")
    timeline.after(session.RunRecord, "__init__", "run_record")
    timeline.after(session, "start_cluster", "ray_start")
    timeline.duration(startup, "read_data", "read_data")
    timeline.duration(startup, "init_ray", "ray_init")
    timeline.after(session.Session, "_start_model", "start_model")
    timeline.after(reward_workers.RewardWorkers, "__init__", "actors_spawned")
    timeline.after(learner_ranks.LearnerRanks, "__init__", "learner")
    timeline.after(rollout_workers.RolloutWorkers, "wait_started", "rollout_workers")
    timeline.after(reward_workers.RewardWorkers, "wait_started", "reward_workers")
    timeline.after(sync.WeightSync, "__init__", "weight_sync")
    timeline.after(session.RunRecord, "begin", "collector")
    timeline.after(session.Session, "record_metrics", "first_iteration")
    timeline.before(session.Session, "close", "rest")

    spawn_rollout = rollout_workers.RolloutWorkers.__init__

    def rollout_init(self, *args, **kwargs):
        spawn_rollout(self, *args, **kwargs)
        timeline.watch_ready("rollout_workers", list(self._ready))

    rollout_workers.RolloutWorkers.__init__ = rollout_init
    spawn_reward = reward_workers.RewardWorkers.__init__

    def reward_init(self, *args, **kwargs):
        spawn_reward(self, *args, **kwargs)
        timeline.watch_ready("reward_workers", [h.ready.remote() for h in self.handles])

    reward_workers.RewardWorkers.__init__ = reward_init
    run_learner = learner_ranks.LearnerRanks.__init__

    def learner_init(self, *args, **kwargs):
        run_learner(self, *args, **kwargs)
        timeline.ready.setdefault("learner", round(timeline.now(), 2))

    learner_ranks.LearnerRanks.__init__ = learner_init

    from rollout.cli import main

    code = main(argv)
    timeline.mark("close")
    stages = timeline.stages()
    stages["exit"] = 0.0  # the parent knows the process's end
    report.write_text(json.dumps({"stages": stages, "ready": timeline.ready, "durations": timeline.durations}))
    return code


# -- the benchmark ------------------------------------------------------------------------------------


def main() -> int:
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        return child(Path(sys.argv[2]), sys.argv[3:])
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=2, help="runs of each mode")
    parser.add_argument("--mode", choices=["both", "plain", "stages"], default="both")
    parser.add_argument("--set", dest="settings", action="append", default=[], help="more job settings")
    parser.add_argument("--timeout-s", type=float, default=600)
    args = parser.parse_args()
    settings = [*SETTINGS, *args.settings]
    modes = ["plain", "stages"] if args.mode == "both" else [args.mode]
    results: dict[str, list[dict]] = {mode: [] for mode in modes}
    with tempfile.TemporaryDirectory(prefix="startup-bench-") as tmp:
        for run in range(args.runs):
            for mode in modes:  # taking turns, so a machine that gets busier weighs on both alike
                out = Path(tmp) / f"{mode}-{run}"
                result = (run_plain if mode == "plain" else run_stages)(out, settings, args.timeout_s)
                results[mode].append(result)
                print(json.dumps({"run": run, "mode": mode, **result}), flush=True)
    summary: dict = {"runs": args.runs, "settings": settings}
    for mode, runs in results.items():
        summary[f"{mode}/process_wall_s"] = round(statistics.median(r["process_wall_s"] for r in runs), 2)
        if mode == "stages":
            for name in runs[0]["stages"]:
                summary[f"stages/{name}_s"] = round(statistics.median(r["stages"][name] for r in runs), 2)
    print(json.dumps({"median": summary}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
