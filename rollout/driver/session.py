"""Everything a PPO run holds between iterations, and the steps the job loop names.

`Session.open` resolves the model (building the tiny one, SFT warm-up), starts or joins Ray,
spawns the rollout, reward and learner actors, and resumes from the newest checkpoint in the run
directory. A resumed run numbers its iterations after the last one already archived, so no
(iteration, prompt_id, sample_index) is ever archived twice.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import msgspec
import ray

from contracts.config import JobConfig
from contracts.config.load import to_yaml
from learner.checkpoint import STATE_FILE, CheckpointWriteError, NonFiniteError
from reward.worker import reward_components
from rollout.actors.telemetry import record_restart
from rollout.archive import ArchiveWriter, last_archived_iteration
from rollout.archive.columns import archive_batches
from rollout.archive.manifest import RunManifest
from rollout.archive.metadata import run_metadata
from rollout.driver.checkpoints import AUTO, Checkpoints
from rollout.driver.iteration import Launched, Learned, Samples
from rollout.driver.learner_group import LearnerError, LearnerGroup
from rollout.driver.metrics import MetricsLog, iteration_metrics
from rollout.driver.node_watch import NodeWatch
from rollout.driver.prompts import PromptSampler
from rollout.driver.reward_group import RewardGroup
from rollout.driver.run_storage import RunStorage
from rollout.driver.startup import lock_run_dir, read_data, run_id, start_cluster
from rollout.driver.trackers import TrackedRun
from rollout.driver.tracking import Tracking, sample_table
from rollout.generation.pool import WorkerPool
from rollout.weight_sync.check import PROBE_IDS


class Session:
    def __init__(self, cfg: JobConfig, run_dir: Path, log, storage: RunStorage | None):
        self.cfg, self.run_dir, self.log, self.storage = cfg, run_dir, log, storage

    @classmethod
    def open(
        cls,
        cfg: JobConfig,
        run_dir: Path,
        *,
        log=None,
        resume: str | Path = AUTO,
        storage: RunStorage | None = None,
    ) -> Session:
        """`resume`: checkpoints.AUTO (the newest whole checkpoint, if any), NEVER, or a checkpoint directory.
        `storage`: the run's URI, of which `run_dir` is the staging copy."""
        self = cls(cfg, run_dir, log or sys.stderr, storage)
        self.resume = resume
        self.data = read_data(cfg, self.log, prompts_needed=cfg.rollout.prompts_per_iteration)
        self.sampler = PromptSampler(size=len(self.data.records), seed=cfg.seed, shuffle=cfg.data.shuffle)
        self.lock = lock_run_dir(run_dir, self.log)
        try:
            if storage:
                storage.take_lease()
                storage.pull(self.log)
            self._start()
        except BaseException:
            self._release()
            raise
        return self

    def _start(self) -> None:
        cfg, run_dir, log, data = self.cfg, self.run_dir, self.log, self.data
        self.run_id = run_id(run_dir, cfg.run_name)
        self.manifest = RunManifest(run_dir, self.run_id)
        self.cfg = cfg = start_cluster(cfg, run_dir, learner=True)
        self.nodes = NodeWatch(log, cfg.ray.node_wait_timeout_s)
        self._push(RunStorage.push_small)
        model = data.base_model
        if cfg.model.sft_warmup:
            from learner.sft import warm_start

            model = warm_start(data.base_model, data.records, cfg.model, seed=cfg.seed, log=log)

        if self.storage:  # actors on nodes that cannot see this disk fetch what they load from the URI
            model = self.storage.stage_model(model)
            if cfg.reward.model is not None:
                reward_model = msgspec.structs.replace(
                    cfg.reward.model, path=self.storage.stage_model(cfg.reward.model.path)
                )
                self.cfg = cfg = msgspec.structs.replace(
                    cfg, reward=msgspec.structs.replace(cfg.reward, model=reward_model)
                )
        self.checkpoints = Checkpoints(run_dir, cfg.checkpoint_keep_last)
        # What a rebuilt learner restarts from: this checkpoint, then each one this run commits.
        self.restart_from = checkpoint = self.checkpoints.resume_point(self.resume, log)
        serving_model = str(checkpoint / "policy") if checkpoint else model
        print(
            f"run {self.run_id}: {len(data.records)} prompts, model {model}, "
            f"{cfg.rollout.num_workers} rollout worker(s), ray {ray.get_runtime_context().gcs_address}",
            file=log,
        )
        self.model = model
        # The engines load while the learner builds: neither start waits for the other.
        self.pool = WorkerPool(cfg, serving_model, wait=False)
        self.rewards = RewardGroup(cfg.reward, self.log)
        self.learner = LearnerGroup(cfg, model)
        self.learner_restarts = 0
        self.pool.wait_started()
        self.pool.use_learner(self.learner)
        updates = 0  # PPO updates the learner's weights hold: its policy version
        next_iteration, resumed_from = 0, None
        if checkpoint:
            extra = self.learner.load(checkpoint)
            self.sampler = msgspec.convert(extra["sampler"], PromptSampler)
            next_iteration = extra["iteration"] + 1
            updates = self.learner.version()
            self.pool.queue_newest(updates)
            self.pool.confirm_weights()
            resumed_from = {"checkpoint": checkpoint.name, "iteration": extra["iteration"], "policy_version": updates}
        # Iterations archived after the last checkpoint lost their updates but keep their rows;
        # numbering continues after them so no (iteration, prompt_id, sample_index) repeats, and the
        # run goes on until the weights hold `iterations` updates, however many crashes came before.
        self.first_iteration = max(next_iteration, last_archived_iteration(run_dir) + 1)
        if checkpoint or self.first_iteration:
            print(
                f"resuming{' from ' + checkpoint.name if checkpoint else ' with no checkpoint'}: "
                f"{updates} of {cfg.iterations} updates done, continuing at iteration {self.first_iteration}",
                file=log,
            )
        self.iterations_left = max(0, cfg.iterations - updates)
        self.last_iteration = self.first_iteration + self.iterations_left - 1
        self.version = self.pool.version
        self.learned = updates  # updates the live learner's weights hold, synced to the workers or not
        self.update_lost: str | None = None  # why the iteration being run lost its update, if it did
        self.launched: dict[int, Launched] = {}
        self.current_iteration = self.first_iteration
        self._last_recorded = time.perf_counter()
        self._restarts_seen: dict[str, int] = {}
        self.components = reward_components(cfg.reward)
        start = self.manifest.start_run(cfg, model, resumed_from)
        metadata = run_metadata(cfg, self.run_id, model, start, learner=True)
        self.archive = ArchiveWriter(
            run_dir / "rollouts",
            metadata,
            self.components,
            batch_rows=cfg.archive.batch_rows,
            rows_per_file=cfg.archive.rows_per_file,
        )
        self.metrics = MetricsLog(run_dir / "metrics.jsonl")
        start = {key: value for key, value in start.items() if key != "config_yaml"}  # the config goes whole
        self.tracking = Tracking(
            cfg.tracking, TrackedRun(run_dir, self.run_id, msgspec.to_builtins(cfg), to_yaml(cfg), start), log
        )

    def _rebuild_learner(self, error: BaseException, iteration: int) -> None:
        """New learner ranks from the newest checkpoint (or the start model); the workers follow."""
        self.learner_restarts += 1
        limit = self.cfg.learner.max_restarts
        first_line = str(error).strip().splitlines()[0]
        if self.learner_restarts > limit:
            raise LearnerError(
                f"a learner rank died again ({first_line}); learner.max_restarts ({limit}) spent"
            ) from error
        checkpoint = self.restart_from
        print(
            f"learner: a rank died in iteration {iteration} ({first_line}); rebuilding it from "
            f"{checkpoint.name if checkpoint else 'the start model'} (restart {self.learner_restarts} of {limit})",
            file=self.log,
            flush=True,
        )
        record_restart("learner")
        self.learner.shutdown()
        self.learner = LearnerGroup(self.cfg, self.model, rebuilt=True)
        updates, resumed_from = 0, None
        if checkpoint:
            extra = self.learner.load(checkpoint)
            updates = self.learner.version()
            resumed_from = {"checkpoint": checkpoint.name, "iteration": extra["iteration"], "policy_version": updates}
        # The lost updates are made again on iterations after the last one planned; an update learned
        # but not yet synced (a rank lost in sync_weights) is lost too.
        self.last_iteration += self.learned - updates
        self.learned = updates
        self.manifest.start_run(self.cfg, self.model, resumed_from, reason=f"learner rebuilt in iteration {iteration}")
        self.pool.use_learner(self.learner)
        self.pool.queue_newest(updates)
        self.version = updates

    def _release(self) -> None:
        """Kill what was started (all of it, or what a start that failed half-way got to) and free the
        run directory. Results still in flight die with their actors: Ray would report each as an
        "unhandled error", so it is told not to."""
        os.environ["RAY_IGNORE_UNHANDLED_ERRORS"] = "1"
        if hasattr(self, "nodes"):
            self.nodes.close()
        for part in ("pool", "learner", "rewards"):
            if hasattr(self, part):
                getattr(self, part).shutdown()
        if self.storage:
            self.storage.release()
        self.lock.release()

    # -- steps -----------------------------------------------------------------------------------

    def iterations(self) -> Iterator[int]:
        """The iterations to run; generation for up to `rollout.max_staleness` later ones is kept in flight.

        Each iteration is launched after the weight sync that precedes it in the loop, so its samples
        are at most `max_staleness` policy versions behind the learner that trains on them.
        """
        iteration = self.first_iteration
        while iteration <= self.last_iteration:  # a rebuilt learner moves the last iteration on
            ahead = min(iteration + self.cfg.rollout.max_staleness, self.last_iteration)
            for later in range(iteration, ahead + 1):
                if later not in self.launched:
                    self.launched[later] = self._launch(later)
            yield iteration
            iteration += 1

    def collect(self, iteration: int, timings: dict[str, float]) -> Samples:
        """Wait for the iteration's generation, then its rewards; only summaries and rewards come here."""
        launched = self.launched.pop(iteration)
        self.current_iteration = iteration  # what a failure in the steps after this one is reported in
        timeout = self.cfg.rollout.iteration_timeout_s
        start = time.perf_counter()
        if launched.after_sync:
            try:
                self.pool.confirm_weights()
            except ray.exceptions.RayActorError as e:  # the learner died in a collective sync: rebuilt, it resends
                self._rebuild_learner(e, iteration)
        total = self.cfg.rollout.prompts_per_iteration * self.cfg.rollout.n_samples
        chunks = list(
            launched.generation.chunks_with_progress(total, f"iter {iteration} generate", self.log, leave=False)
        )
        timings["generate"] = time.perf_counter() - start
        start = time.perf_counter()
        rewards, latency = self.rewards.scores(chunks, timeout, f"rewards of iteration {iteration}")
        timings["reward"] = time.perf_counter() - start
        return Samples(iteration, chunks, rewards, launched.sampler, latency)

    def learn(self, samples: Samples, timings: dict[str, float]) -> Learned:
        """One PPO update on the iteration's samples. A learner rank whose process died costs the
        updates since the newest checkpoint: the group is rebuilt from it and learns on these samples."""
        while True:
            try:
                columns, stats, learn_timings = self.learner.learn(
                    [c.batch for c in samples.chunks], [c.rewards for c in samples.chunks]
                )
                self.learned += 1
                break
            except ray.exceptions.RayActorError as e:
                self._rebuild_learner(e, samples.iteration)
            except ray.exceptions.RayTaskError as e:
                if isinstance(e.cause, NonFiniteError):  # the learner cannot say which iteration it was
                    raise NonFiniteError(f"iteration {samples.iteration}: {e.cause}") from None
                raise
        timings.update(learn_timings)
        return Learned(columns, stats)

    def sync_weights(self) -> None:
        """Queue the new weights on every worker behind the generation already in flight."""
        try:
            version = self.learner.version()
            self.pool.probe.expect(version, self.learner.probe_logprobs(list(PROBE_IDS)))
            self.pool.queue_newest(version)
        except ray.exceptions.RayActorError as e:  # the rebuilt learner queues its own weights
            self._rebuild_learner(e, self.current_iteration)
            # This iteration's update went with the rank, before the manifest recorded the iteration.
            self.update_lost = f"learner rebuilt in iteration {self.current_iteration} before its weight sync"
            return
        self.version = version

    def archive_iteration(self, samples: Samples, learned: Learned) -> None:
        """Queued: the archive's thread fetches the columns, joins and writes them, off this loop's path."""
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

    def record_metrics(self, samples: Samples, learned: Learned, timings: dict[str, float]) -> dict:
        metrics = iteration_metrics(
            samples.iteration,
            samples.summaries,
            samples.rewards,
            {**learned.stats, **samples.latency},
            timings,
            self.version,
        )
        # Wall-clock seconds since the last iteration's line; stages overlap, so it is not their sum.
        now = time.perf_counter()
        metrics["time/wall"], self._last_recorded = now - self._last_recorded, now
        if self.pool.probe.gap is not None:  # of the last sync confirmed
            metrics["weight_sync/logprob_gap"] = self.pool.probe.gap
        # Restarts since the last line (reward workers report theirs with the first batch they score).
        counts = {"rollout": self.pool.restarts, "learner": self.learner_restarts}
        for kind, count in counts.items():
            metrics[f"restarts/{kind}"] = count - self._restarts_seen.get(kind, 0)
        metrics["restarts/reward"] = int(metrics.get("restarts/reward", 0))
        self._restarts_seen = counts
        self.metrics.write(metrics)
        table = None
        if self.tracking.wants_samples(samples.iteration):
            texts = ray.get(samples.chunks[0].batch, timeout=self.cfg.rollout.iteration_timeout_s)
            table = sample_table(texts, samples.rewards[0], self.cfg.tracking.samples_rows)
        self.tracking.log_iteration(metrics, table)
        self.manifest.iteration(
            samples.iteration,
            generated_by=[s.policy_version for s in samples.summaries],
            policy_version=self.version,
            update_lost=self.update_lost,
        )
        self.update_lost = None
        self._push(RunStorage.push_small)
        print(self.metrics.progress_line(metrics, self.last_iteration), file=self.log, flush=True)
        return metrics

    def checkpoint_if_due(self, samples: Samples) -> None:
        """Every `checkpoint_every` iterations and after the last: written under a temporary name and
        renamed whole, so `latest` never names half a checkpoint; then old ones are pruned."""
        iteration = samples.iteration
        if (iteration + 1) % self.cfg.checkpoint_every and iteration != self.last_iteration:
            return
        # The next iteration's weights are queued already: its generation runs while the learner saves.
        if iteration + 1 <= self.last_iteration and iteration + 1 not in self.launched:
            self.launched[iteration + 1] = self._launch(iteration + 1)
        # The archive holds every trained iteration before a checkpoint says they were trained.
        self.archive.flush()
        partial = self.checkpoints.partial(iteration)
        extra = {"iteration": iteration, "sampler": samples.sampler, "run_id": self.run_id}
        try:
            self.learner.save(partial, extra)
        except ray.exceptions.RayActorError as e:  # this iteration's update is lost with the rank
            shutil.rmtree(partial, ignore_errors=True)
            self._rebuild_learner(e, iteration)
            return
        if self.storage:  # ranks on nodes that cannot see this disk published their parts to the URI
            self.storage.pull_tree(partial.relative_to(self.run_dir).as_posix())
        if not (partial / STATE_FILE).is_file():  # rank 0 saved on a disk this process does not see
            raise CheckpointWriteError(
                f"the learner saved checkpoint {partial.name} where the driver cannot see it ({partial} is not "
                "on this node's disk): put --out on storage every node mounts, or in an object store "
                "(--out s3://bucket/run), through which the ranks publish what they write"
            )
        # The policy directory is a complete model: a resumed run's engines load it directly.
        self.data.tokenizer.save_pretrained(partial / "policy")
        self.restart_from = self.checkpoints.commit(partial)
        self.manifest.checkpoint(iteration, self.restart_from.name)
        self._push(RunStorage.push_checkpoint, self.restart_from)

    def close(self, *, failed: bool = False) -> None:
        try:
            self.archive.close()
        finally:
            self.tracking.close(failed=failed)
            try:
                self._push(RunStorage.push_all)
            finally:
                self._release()

    # -- helpers ---------------------------------------------------------------------------------

    def _push(self, step, *args) -> None:
        """Mirror the staging copy to the run's URI (a step of RunStorage), when the run has one."""
        if self.storage:
            step(self.storage, *args)

    def _launch(self, iteration: int) -> Launched:
        """Sample the iteration's prompts and queue their generation, and each chunk's scoring behind it."""
        tasks = []
        for index in self.sampler.next_batch(self.cfg.rollout.prompts_per_iteration):
            tasks.append(self.data.tasks[self.data.records[index].prompt_id])
        generation = self.pool.submit(
            tasks,
            run_id=self.run_id,
            iteration=iteration,
            scorers=self.rewards.workers,
            records=self.data.records_by_id,
        )
        # The data cursor after this iteration's prompts: what a checkpoint of this iteration resumes from.
        return Launched(generation, msgspec.to_builtins(self.sampler), self.pool.has_queued_weights())
