"""The PPO job (`rollout run`): the loop is a list of named steps; each step is a method of `Session`.

launch generation ahead -> collect (generate, reward) -> learn (values, advantages, update)
-> weight sync (queued behind generation in flight) -> held-out evaluation when due (queued behind the sync)
-> archive (streamed) -> checkpoint (staged, then written in the background) -> metrics (with the evaluation's)
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path

from contracts.config import JobConfig
from rollout.driver import stopping
from rollout.driver.checkpoints import AUTO
from rollout.driver.metrics import print_summary
from rollout.driver.run_storage import RunStorage
from rollout.driver.session import Session


def run_job(
    cfg: JobConfig,
    run_dir: Path,
    *,
    log=None,
    resume: str | Path = AUTO,
    storage: RunStorage | None = None,
    on_iteration: Callable[[dict], bool | None] | None = None,
) -> list[dict]:
    """Train for `cfg.iterations`, resuming from the newest whole checkpoint in `run_dir` if there is
    one (`resume`: checkpoints.AUTO, NEVER or a checkpoint directory). With `storage`, `run_dir` is
    its staging copy, pulled from the run's URI first and pushed back as the run goes. `on_iteration(metrics)`
    is called after each iteration's metrics line; False ends the run there, as a finished one, checkpointed.

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
            session.evaluate_if_due(iteration)
            timed(timings, "archive", session.archive_iteration, samples, learned)
            session.checkpoint_if_due(samples, timings)
            history.append(session.record_metrics(samples, learned, timings))
            if on_iteration is not None and on_iteration(dict(history[-1])) is False:
                session.stop_after(samples)
                break
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
