"""Everything a run writes, in one place: the run directory (locked to one driver) or the staging copy of
its URI (`--out s3://...`, pushed there as files change), its id and manifest, the archive, the metrics
lines and the trackers that mirror them, and the checkpoints.

The session tells it what happened (an iteration collected, learned and synced; a checkpoint due; the
learner rebuilt) and it writes that down, in the order readers rely on: an iteration's rows are archived
before a checkpoint says it was trained, a checkpoint's files are whole before `latest` names it, and the
run storage gets each after it is written.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import msgspec
import ray

from contracts.config import JobConfig
from contracts.config.load import to_yaml
from learner.checkpoint import STATE_FILE, CheckpointWriteError
from reward.worker import reward_components
from rollout.archive import ArchiveWriter, last_archived_iteration
from rollout.archive.columns import archive_batches
from rollout.archive.manifest import RunManifest
from rollout.archive.metadata import run_metadata
from rollout.driver.checkpoints import Checkpoints
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
        self.checkpoints = Checkpoints(run_dir, cfg.checkpoint_keep_last)
        self.model = ""  # the start model, once the session has it
        self.tokenizer = None  # saved into each checkpoint's policy/, so that engines can load it
        self._writing: tuple[int, Path] | None = None  # the checkpoint being written: (iteration, partial)
        self._written_s: float | None = None  # how long the last one committed took to write, until reported
        self.update_lost: str | None = None  # why the iteration being run lost its update, if it did
        self._recorded_through = -1  # the last iteration whose metrics line and manifest entry are written
        self._last_recorded = time.perf_counter()
        self._restarts_seen: dict[str, int] = {}
        self.said_short = False  # dynamic sampling's console line, said once per run

    def push(self, step, *args) -> None:
        """Mirror the staging copy to the run's URI (a step of RunStorage), when the run has one."""
        if self.storage:
            step(self.storage, *args)

    def begin(self, cfg: JobConfig, model: str, resumed_from: dict | None, tokenizer) -> int:
        """This start in the manifest, and the archive, metrics and trackers open; the first iteration to
        run. Iterations archived after the last checkpoint lost their updates but keep their rows: numbering
        continues after them, so no (iteration, prompt_id, sample_index) is ever archived twice."""
        self.cfg, self.model, self.tokenizer = cfg, model, tokenizer
        start = self.manifest.start_run(cfg, model, resumed_from)
        self.components = reward_components(cfg.reward)
        self.archive = ArchiveWriter(
            self.run_dir / "rollouts",
            run_metadata(cfg, self.run_id, model, start, learner=True),
            self.components,
            batch_rows=cfg.archive.batch_rows,
            rows_per_file=cfg.archive.rows_per_file,
        )
        self.metrics = MetricsLog(self.run_dir / "metrics.jsonl")
        start = {key: value for key, value in start.items() if key != "config_yaml"}  # the config goes whole
        run = TrackedRun(self.run_dir, self.run_id, msgspec.to_builtins(cfg), to_yaml(cfg), start)
        self.tracking = Tracking(cfg.tracking, run, self.log)
        next_iteration = resumed_from["iteration"] + 1 if resumed_from else 0
        return max(next_iteration, last_archived_iteration(self.run_dir) + 1)

    def learner_rebuilt(self, rebuilt) -> None:
        """A new start in the manifest; an update made in this iteration and lost before it was recorded
        is labelled so on the iteration's entry."""
        reason = f"learner rebuilt in iteration {rebuilt.iteration}"
        self.manifest.start_run(self.cfg, self.model, rebuilt.resumed_from, reason=reason)
        if rebuilt.after_update and rebuilt.iteration > self._recorded_through:
            self.update_lost = f"{reason} before its weight sync"

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
                self.components,
            )
        )

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
        learner,
    ) -> dict:
        """The iteration's manifest entry, a checkpoint committed if its background write is done, then the
        metrics line (and the trackers', and Prometheus') and the progress line; `restarts`: each kind's
        count so far (reward workers report theirs with the first batch they score)."""
        metrics = iteration_metrics(
            samples.iteration,
            samples.summaries,
            samples.rewards,
            {**learned.stats, **samples.latency},
            timings,
            version,
        )
        # Wall-clock seconds since the last iteration's line; stages overlap, so it is not their sum.
        now = time.perf_counter()
        metrics["time/wall"], self._last_recorded = now - self._last_recorded, now
        if sync_gap is not None:  # of the last sync confirmed
            metrics["weight_sync/logprob_gap"] = sync_gap
        if samples.selection is not None:
            metrics["dynamic_sampling/filtered_groups"] = samples.selection.filtered
            metrics["dynamic_sampling/rounds"] = samples.rounds
        for kind, count in restarts.items():
            metrics[f"restarts/{kind}"] = count - self._restarts_seen.get(kind, 0)
        metrics["restarts/reward"] = int(metrics.get("restarts/reward", 0))
        self._restarts_seen = restarts
        self.manifest.iteration(
            samples.iteration,
            generated_by=[s.policy_version for s in samples.summaries],
            policy_version=version,
            update_lost=self.update_lost,
        )
        self.update_lost, self._recorded_through = None, samples.iteration
        self.commit_written(learner, wait=False)
        if self._written_s is not None:  # the background write of the checkpoint committed last
            metrics["time/checkpoint_write"], self._written_s = self._written_s, None
        self.metrics.write(metrics)
        table = None
        if self.tracking.wants_samples(samples.iteration):
            texts = ray.get(samples.chunks[0].batch, timeout=self.cfg.rollout.iteration_timeout_s)
            table = sample_table(texts, samples.rewards[0], self.cfg.tracking.samples_rows)
        self.tracking.log_iteration(metrics, table)
        self.push(RunStorage.push_small)
        print(self.metrics.progress_line(metrics, last_iteration), file=self.log, flush=True)
        return metrics

    # -- checkpoints -------------------------------------------------------------------------------

    def checkpoint(self, iteration: int, extra: dict, learner) -> None:
        """Stage the learner's checkpoint of `iteration`, which is then written in the background: the loop
        waits only for the archive to hold every trained iteration, the write before this one, and the
        staging copy. It is committed, whole, by `commit_written`."""
        self.archive.flush()  # the archive holds every trained iteration before a checkpoint says they were trained
        self.commit_written(learner, wait=True)  # one write at a time
        partial = self.checkpoints.partial(iteration)
        self._writing = (iteration, partial)  # before the call: a rank lost in it is salvaged from this
        if not learner.save(partial, {**extra, "iteration": iteration, "run_id": self.run_id}):
            self._writing = None

    def commit_written(self, learner, *, wait: bool) -> float | None:
        """The checkpoint being written, made whole once it is (with `wait`, once it is written): its files
        pulled from ranks on other nodes, its tokenizer, its manifest, its final name, then `latest`, old ones
        pruned, the run storage updated and the learner's restart point moved to it. The write's seconds, or
        None when none was committed (still writing, or lost with a rank: the one before stays `latest`)."""
        if self._writing is None:
            return None
        seconds = learner.written(wait)
        if seconds is None:
            if learner.writing is None:
                self._writing = None
            return None
        self._commit(learner, seconds)
        return seconds

    def salvage(self, learner) -> None:
        """Before the learner is rebuilt: the checkpoint its lost rank was writing is committed if its write
        finished (rank 0 writes `learner.pt` last, once every rank's shards are in), so the new ranks start
        from it; otherwise it is removed, and the one before stays `latest`."""
        if self._writing is None:
            return
        _, partial = self._writing
        if (partial / STATE_FILE).is_file():
            self._commit(learner, None)
        else:
            shutil.rmtree(partial, ignore_errors=True)
            self._writing = None

    def _commit(self, learner, seconds: float | None) -> None:
        iteration, partial = self._writing
        self._writing = None
        if self.storage:  # ranks on nodes that cannot see this disk published their parts to the URI
            self.storage.pull_tree(partial.relative_to(self.run_dir).as_posix())
        if not (partial / STATE_FILE).is_file():  # rank 0 saved on a disk this process does not see
            raise CheckpointWriteError(
                f"the learner saved checkpoint {partial.name} where the driver cannot see it ({partial} is not "
                "on this node's disk): put --out on storage every node mounts, or in an object store "
                "(--out s3://bucket/run), through which the ranks publish what they write"
            )
        self.tokenizer.save_pretrained(partial / "policy")  # the policy directory is a complete model: engines load it
        committed = self.checkpoints.commit(partial)
        self.manifest.checkpoint(iteration, committed.name)
        self.push(RunStorage.push_checkpoint, committed)
        learner.restart_from = committed
        self._written_s = seconds

    # -- the end -----------------------------------------------------------------------------------

    def close(self, learner, *, failed: bool = False) -> None:
        """Commit the checkpoint being written (unless the job failed), write what is queued, close the
        trackers and push everything (then `release`, once the actors whose objects the archive reads are gone)."""
        try:
            if not failed and learner is not None:
                self.commit_written(learner, wait=True)
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
