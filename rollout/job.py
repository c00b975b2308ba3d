"""The PPO job (`rollout run`): the loop is a list of named steps; each step is a function below it.

    sample prompts -> generate -> reward -> values, advantages, update (learner) -> weight sync
    -> archive -> metrics -> checkpoint
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pyarrow.compute as pc

from rollout.archive import archive_files, read_table
from rollout.config import JobConfig
from rollout.metrics import iteration_metrics, print_summary
from rollout.session import Session


def run_job(cfg: JobConfig, run_dir: Path, *, log=sys.stderr) -> list[dict]:
    """Train for `cfg.iterations`, resuming from the newest checkpoint in `run_dir` if there is one."""
    session = Session.open(cfg, run_dir, log=log)
    history: list[dict] = []
    try:
        for iteration in range(session.first_iteration, session.first_iteration + session.iterations_left):
            timings: dict[str, float] = {}
            tasks = session.sample_prompts()
            records, gen_stats = session.generate_and_reward(tasks, iteration, timings)
            records, learn_stats, learn_timings = session.learn(records)
            timings.update(learn_timings)
            timed(timings, "weight_sync", session.sync_weights)
            timed(timings, "archive", session.archive_iteration, records)
            metrics = iteration_metrics(iteration, records, gen_stats, learn_stats, timings, session.version)
            session.metrics.write(metrics)
            history.append(metrics)
            print(session.metrics.progress_line(metrics, session.last_iteration), file=log, flush=True)
            if (iteration + 1) % cfg.checkpoint_every == 0 or iteration == session.last_iteration:
                session.checkpoint(iteration)
    finally:
        session.close()
    print_summary(history, log)
    return history


def timed(timings: dict[str, float], stage: str, fn, *args):
    start = time.perf_counter()
    result = fn(*args)
    timings[stage] = time.perf_counter() - start
    return result


def last_archived_iteration(run_dir: Path) -> int:
    """The highest iteration already in the run's archive, or -1."""
    try:
        archive_files(run_dir)
    except FileNotFoundError:
        return -1
    table = read_table(run_dir, columns=["iteration"])
    return -1 if table.num_rows == 0 else int(pc.max(table["iteration"]).as_py())

