"""The PPO job (`rollout run`): the loop is a list of named steps; each step is a method of `Session`.

launch generation ahead -> collect (generate, reward) -> learn (values, advantages, update)
-> weight sync (queued behind generation in flight) -> archive (streamed) -> checkpoint (staged, then
written in the background) -> metrics
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from contracts.config import JobConfig
from rollout.driver import stopping
from rollout.driver.checkpoints import AUTO
from rollout.driver.metrics import print_summary
from rollout.driver.run_storage import RunStorage
from rollout.driver.session import Session


def run_job(
    cfg: JobConfig, run_dir: Path, *, log=None, resume: str | Path = AUTO, storage: RunStorage | None = None
) -> list[dict]:
    """Train for `cfg.iterations`, resuming from the newest whole checkpoint in `run_dir` if there is
    one (`resume`: checkpoints.AUTO, NEVER or a checkpoint directory). With `storage`, `run_dir` is
    its staging copy, pulled from the run's URI first and pushed back as the run goes.

    SIGTERM or SIGINT raise `stopping.JobStopped` out of here once the session is closed."""
    log = log or sys.stderr
    stopping.install()
    session = Session.open(cfg, run_dir, log=log, resume=resume, storage=storage)
    history: list[dict] = []
    try:
        for iteration in session.iterations():
            timings: dict[str, float] = {}
            samples = session.collect(iteration, timings)
            learned = session.learn(samples, timings)
            timed(timings, "weight_sync", session.sync_weights)
            timed(timings, "archive", session.archive_iteration, samples, learned)
            session.checkpoint_if_due(samples, timings)
            history.append(session.record_metrics(samples, learned, timings))
    except BaseException:
        session.close(failed=True)
        raise
    session.close()
    print_summary(history, log)
    return history


def timed(timings: dict[str, float], stage: str, fn, *args):
    start = time.perf_counter()
    result = fn(*args)
    timings[stage] = time.perf_counter() - start
    return result
