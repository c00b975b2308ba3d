"""The run's files: the run directory (locked to one driver) or the staging copy of its URI
(`--out s3://...`, pushed there as files change), its id and manifest, the archive, the metrics lines and
the trackers that mirror them. Its checkpoints are `checkpoints.Checkpoints`'.

The session tells it what happened (an iteration collected, learned and synced; the learner rebuilt) and
it writes that down; the archive is flushed before a checkpoint says its iterations were trained.
"""

from __future__ import annotations

from pathlib import Path

import msgspec
import ray

from contracts.config import JobConfig
from contracts.config.load import to_yaml
from reward.worker import reward_components
from rollout.archive import ArchiveWriter, last_archived_iteration
from rollout.archive.columns import archive_batches
from rollout.archive.manifest import RunManifest
from rollout.archive.metadata import run_metadata
from rollout.driver.iteration import Learned, Samples
from rollout.driver.metrics import MetricsLog, iteration_metrics
from rollout.driver.run_storage import RunStorage
from rollout.driver.startup import lock_run_dir, run_id
from rollout.driver.trackers import TrackedRun
from rollout.driver.tracking import Tracking, sample_table


class RunRecord:
    def __init__(self, cfg: JobConfig, run_dir: Path, log, storage: RunStorage | None):
        """Take the run directory (and the run storage's lease, pulling what it holds first)."""
        self.cfg, self.run_dir, self.log, self.storage = cfg, run_dir, log, storage
        self.lock = lock_run_dir(run_dir, log)
        self.archive: ArchiveWriter | None = None
        self.tracking: Tracking | None = None
        try:
            if storage:
                storage.take_lease()
                storage.pull(log)
            self.run_id = run_id(run_dir, cfg.run_name)
            self.manifest = RunManifest(run_dir, self.run_id)
        except BaseException:
            self.release()
            raise
        self.metrics = MetricsLog(run_dir / "metrics.jsonl")
        self.model = ""  # the start model, once the session has it

    def push(self, step, *args) -> None:
        """Mirror the staging copy to the run's URI (a step of RunStorage), when the run has one."""
        if self.storage:
            step(self.storage, *args)

    def begin(self, cfg: JobConfig, model: str, resumed_from: dict | None) -> int:
        """This start in the manifest, and the archive, metrics and trackers open; the first iteration to
        run. Iterations archived after the last checkpoint lost their updates but keep their rows: numbering
        continues after them, so no (iteration, prompt_id, sample_index) is ever archived twice."""
        self.cfg, self.model = cfg, model
        self.start = start = self.manifest.start_run(cfg, model, resumed_from)
        self.archive = ArchiveWriter(
            self.run_dir / "rollouts",
            run_metadata(cfg, self.run_id, model, start, learner=True),
            reward_components(cfg.reward),
            batch_rows=cfg.archive.batch_rows,
            rows_per_file=cfg.archive.rows_per_file,
        )
        start = {key: value for key, value in start.items() if key != "config_yaml"}  # the config goes whole
        run = TrackedRun(self.run_dir, self.run_id, msgspec.to_builtins(cfg), to_yaml(cfg), start)
        self.tracking = Tracking(cfg.tracking, run, self.log)
        next_iteration = resumed_from["iteration"] + 1 if resumed_from else 0
        return max(next_iteration, last_archived_iteration(self.run_dir) + 1)

    def learner_rebuilt(self, rebuilds: list) -> None:
        """A new start in the manifest for each rebuild of the learner (`LearnerRanks.rebuilds`)."""
        for rebuilt in rebuilds:
            reason = f"learner rebuilt in iteration {rebuilt.iteration}"
            self.manifest.start_run(self.cfg, self.model, rebuilt.resumed_from, reason=reason)

    # -- an iteration ------------------------------------------------------------------------------

    def archive_iteration(self, samples: Samples, learned: Learned) -> None:
        """Queued: the archive's thread fetches the columns, joins and writes them, off the loop's path."""
        timeout = self.cfg.rollout.iteration_timeout_s
        batches = [c.batch for c in samples.chunks]
        self.archive.write_later(
            lambda: archive_batches(
                ray.get(batches, timeout=timeout),
                samples.rewards,
                ray.get(learned.columns, timeout=timeout),
                self.archive.components,
            )
        )

    def trained(self, samples: Samples, version: int, rebuilds: list) -> None:
        """The iteration's manifest entry, after a start for each learner rebuild since the last entry; an
        update the iteration made and lost with a rebuild after it is labelled so."""
        self.learner_rebuilt(rebuilds)
        lost = any(r.after_update and r.iteration == samples.iteration for r in rebuilds)
        self.manifest.iteration(
            samples.iteration,
            generated_by=[s.policy_version for s in samples.summaries],
            policy_version=version,
            update_lost=f"learner rebuilt in iteration {samples.iteration} before its weight sync" if lost else None,
        )

    def flush_archive(self) -> None:
        """Every iteration queued is in the archive (before a checkpoint says it was trained)."""
        self.archive.flush()

    def record(
        self,
        samples: Samples,
        learned: Learned,
        timings: dict[str, float],
        *,
        version: int,
        sync_gap: float | None,
        restarts: dict[str, int],
        last_iteration: int,
        checkpoint_write_s: float | None,
        evaluation: dict | None = None,
    ) -> dict:
        """The metrics line (and the trackers', and Prometheus') and the progress line; `restarts`: each kind's
        count so far (reward workers report theirs with the first batch they score); `checkpoint_write_s`:
        the background write of the checkpoint committed since the last line."""
        metrics = iteration_metrics(
            samples.iteration,
            samples.summaries,
            samples.rewards,
            {**learned.stats, **samples.latency},
            timings,
            version,
        )
        self.metrics.add_wall_time(metrics)
        if sync_gap is not None:  # of the last sync confirmed
            metrics["weight_sync/logprob_gap"] = sync_gap
        if samples.selection is not None and self.cfg.rollout.dynamic_sampling.enabled:
            metrics["dynamic_sampling/filtered_groups"] = samples.selection.filtered
            metrics["dynamic_sampling/rounds"] = samples.rounds
        if self.cfg.rollout.partial_rollouts:
            metrics.update(partial_metrics(samples))
        self.metrics.add_step_fill(metrics, samples.summaries)
        self.metrics.add_restarts(metrics, restarts)
        if checkpoint_write_s is not None:
            metrics["time/checkpoint_write"] = checkpoint_write_s
        if evaluation is not None:  # the evaluation collected in this iteration (`eval/*`)
            metrics.update(evaluation)
        self.metrics.write(metrics)
        table = None
        if self.tracking.wants_samples(samples.iteration):
            texts = ray.get(samples.chunks[0].batch, timeout=self.cfg.rollout.iteration_timeout_s)
            table = sample_table(texts, samples.rewards[0], self.cfg.tracking.samples_rows)
        self.tracking.log_iteration(metrics, table)
        self.push(RunStorage.push_small)
        print(self.metrics.progress_line(metrics, last_iteration), file=self.log, flush=True)
        return metrics

    # -- the end -----------------------------------------------------------------------------------

    def close(self, *, failed: bool = False) -> None:
        """Write what is queued, close the trackers and push everything (then `release`, once the actors whose
        objects the archive reads are gone)."""
        try:
            if self.archive is not None:
                self.archive.close()
        finally:
            if self.tracking is not None:
                self.tracking.close(failed=failed)
            self.push(RunStorage.push_all)

    def release(self) -> None:
        """Free the run directory and the run storage's lease."""
        if self.storage:
            self.storage.release()
        self.lock.release()


def partial_metrics(samples: Samples) -> dict[str, int]:
    """Partial rollouts' figures of an iteration: rows resumed after a weight load, rows left out as too stale,
    groups carried over to later iterations, and the versions its tokens span (newest last token's minus the
    oldest first token's)."""
    summaries = samples.summaries
    first = min((v for s in summaries for v in s.row_versions or ()), default=0)
    last = max((s.last_version for s in summaries if s.last_version is not None), default=first)
    return {
        "partial/resumed_samples": sum(s.resumed_samples for s in summaries),
        "partial/dropped_stale": samples.dropped_stale,
        "partial/carried_over": samples.carried_over,
        "partial/version_spread": last - first,
    }
