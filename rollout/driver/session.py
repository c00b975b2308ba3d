"""The PPO run as a recipe: what it holds between iterations, and the steps the job loop names.

`Session.open` reads the data while it starts or joins Ray, takes the run directory (`RunRecord`), prepares the
start model (the builtin, SFT warm-up, staged into the run storage), starts the three groups of actors
(rollout workers, reward workers, learner ranks; each recovers its own members), the weight sync between
them and the collector that feeds the learner, and resumes from the newest whole checkpoint
(`Checkpoints`, which also keeps the write in flight and where a rebuilt learner restarts). Each step
below is a few calls on those objects; none catches an actor's error: the groups and the weight sync deal
with deaths and hangs, and what they cannot mend ends the job with one line.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import msgspec
import ray

from contracts.config import JobConfig
from rollout.actors.learner_ranks import LearnerRanks
from rollout.actors.learner_spec import LearnerSpec
from rollout.actors.reward_workers import RewardWorkers
from rollout.actors.rollout_workers import RolloutWorkers
from rollout.driver.checkpoints import AUTO, Checkpoints
from rollout.driver.collector import Collector
from rollout.driver.evaluation import Evaluations, Evaluator
from rollout.driver.iteration import Learned, Samples
from rollout.driver.node_watch import NodeWatch
from rollout.driver.prompts import PromptSampler
from rollout.driver.run_record import RunRecord
from rollout.driver.run_storage import RunStorage
from rollout.driver.startup import RunData, read_data_starting_ray, start_cluster
from rollout.driver.teacher import teacher_model_path
from rollout.weight_sync.path import weight_sync_path
from rollout.weight_sync.sync import WeightSync


class Session:
    def __init__(self, cfg: JobConfig, data: RunData, record: RunRecord):
        self.cfg, self.data, self.record = cfg, data, record
        self.checkpoints = Checkpoints(
            record.run_dir,
            cfg.checkpoint_keep_last,
            manifest=record.manifest,
            storage=record.storage,
            tokenizer=data.tokenizer,
        )
        self.nodes: NodeWatch | None = None
        self.workers: RolloutWorkers | None = None
        self.rewards: RewardWorkers | None = None
        self.learner: LearnerRanks | None = None
        self.weights: WeightSync | None = None
        self.collector: Collector | None = None
        self.first_iteration = self.planned_last = 0

    @classmethod
    def open(
        cls, cfg: JobConfig, run_dir: Path, *, log=None, resume: str | Path = AUTO, storage: RunStorage | None = None
    ) -> Session:
        """`resume`: checkpoints.AUTO (the newest whole checkpoint, if any), NEVER, or a checkpoint directory.
        `storage`: the run's URI, of which `run_dir` is the staging copy."""
        log = log or sys.stderr
        data = read_data_starting_ray(cfg, run_dir, log, learner=True, prompts_needed=cfg.rollout.prompts_per_iteration)
        self = cls(cfg, data, RunRecord(cfg, run_dir, log, storage))
        try:
            self._start(resume)
        except BaseException:
            self._release()
            raise
        return self

    def _start(self, resume: str | Path) -> None:
        record, log = self.record, self.record.log
        self.cfg = cfg = start_cluster(self.cfg, record.run_dir, learner=True)
        self.nodes = NodeWatch(log, cfg.ray.node_wait_timeout_s)
        record.push(RunStorage.push_small)
        model = self._start_model()
        checkpoint = self.checkpoints.resume_point(resume, log)
        print(
            f"run {record.run_id}: {len(self.data.prompts)} prompts, model {model}, "
            f"{cfg.rollout.num_workers} rollout worker(s), ray {ray.get_runtime_context().gcs_address}",
            file=log,
        )
        # The engines load while the learner builds: neither start waits for the other.
        self.workers = RolloutWorkers.of_job(
            cfg, str(checkpoint / "policy") if checkpoint else model, log=log, wait=False
        )
        self.rewards = RewardWorkers(cfg.reward, start_timeout_s=cfg.ray.actor_start_timeout_s, log=log)
        spec = LearnerSpec.of_job(cfg, model, teacher_model_path(cfg))
        self.learner = LearnerRanks(spec, cfg.ray, checkpoints=self.checkpoints, log=log)
        self.workers.wait_started()
        self.rewards.wait_started()
        self.weights = WeightSync(
            cfg.rollout,
            weight_sync_path(cfg),
            dtype=cfg.model.dtype,
            workers=self.workers,
            learner=self.learner,
            node_wait_timeout_s=cfg.ray.node_wait_timeout_s,
        )
        resumed_from = None
        sampler = PromptSampler(size=len(self.data.prompts), seed=cfg.seed, shuffle=cfg.data.shuffle)
        if checkpoint:
            extra = self.learner.load(checkpoint)
            sampler = msgspec.convert(extra["sampler"], PromptSampler)
            resumed_from = {"checkpoint": checkpoint.name, "iteration": extra["iteration"]}
            resumed_from["policy_version"] = self.learner.updates
            self.weights.queue()
            self.weights.confirm()
        self.first_iteration = record.begin(cfg, model, resumed_from)
        evaluator = None
        if self.data.eval_prompts is not None:  # the eval section's held-out prompts, on the same workers
            evaluator = Evaluator(
                cfg,
                self.data.eval_prompts,
                self.workers,
                rewards=self.rewards,
                run_dir=record.run_dir,
                run_id=record.run_id,
                model=model,
                start=record.start,
                log=log,
                weights=self.weights,
            )
        self.collector = Collector(
            cfg,
            self.data,
            self.workers,
            self.rewards,
            run_id=record.run_id,
            log=log,
            sampler=sampler,
            weights=self.weights,
            evaluations=Evaluations(cfg, evaluator),
        )
        updates = self.learner.updates
        # The run goes on until the weights hold `iterations` updates, however many crashes came before.
        self.planned_last = self.first_iteration + max(0, cfg.iterations - updates) - 1
        if checkpoint or self.first_iteration:
            print(
                f"resuming{' from ' + checkpoint.name if checkpoint else ' with no checkpoint'}: "
                f"{updates} of {cfg.iterations} updates done, continuing at iteration {self.first_iteration}",
                file=log,
            )

    def _start_model(self) -> str:
        """The model the learner starts from (the SFT warm-up's, if asked), staged where every node can
        fetch it (and the reward model too) when the run lives at a URI."""
        cfg, model = self.cfg, self.data.base_model
        if cfg.model.sft_warmup:
            from learner.sft import warm_start

            model = warm_start(model, self.data.prompts.records(), cfg.model, seed=cfg.seed, log=self.record.log)
        storage = self.record.storage
        if storage:  # actors on nodes that cannot see this disk fetch what they load from the URI
            model = storage.stage_model(model)
            if cfg.reward.model is not None:
                reward_model = msgspec.structs.replace(
                    cfg.reward.model, path=storage.stage_model(cfg.reward.model.path)
                )
                self.cfg = msgspec.structs.replace(cfg, reward=msgspec.structs.replace(cfg.reward, model=reward_model))
        return model

    @property
    def last_iteration(self) -> int:
        """The planned last iteration, moved on by every update a rebuilt learner lost (made again)."""
        return self.planned_last + self.learner.lost_updates

    # -- steps -------------------------------------------------------------------------------------

    def iterations(self) -> Iterator[int]:
        """The iterations to run; generation for up to `rollout.max_staleness` later ones is kept in flight.

        Each iteration is launched after the weight sync that precedes it in the loop, so its samples are
        at most `max_staleness` policy versions behind the learner that trains on them (with partial
        rollouts, the collector leaves out any row that is older).
        """
        iteration = self.first_iteration
        # Partial rollouts spend the staleness on carrying groups over instead: the workers keep generating
        # between calls, so each iteration is launched only once the sync before it is queued.
        ahead = 0 if self.cfg.rollout.partial_rollouts else self.cfg.rollout.max_staleness
        while iteration <= self.last_iteration:
            for later in range(iteration, min(iteration + ahead, self.last_iteration) + 1):
                self.collector.launch(later, trains_at=self.learner.updates + later - iteration)
            self.collector.evaluations.at_start(iteration)
            yield iteration
            iteration += 1

    def collect(self, iteration: int, timings: dict[str, float]) -> Samples:
        """The iteration's samples (`Collector.collect`): its generation, its rewards, dynamic sampling's rounds."""
        self.learner.iteration = iteration  # what a rebuild in the steps after this one is reported in
        return self.collector.collect(iteration, timings)

    def learn(self, samples: Samples, timings: dict[str, float]) -> Learned:
        """One PPO update on the iteration's samples (a rank lost in it is rebuilt and learns them again)."""
        selected = samples.selection.rows if samples.selection is not None else None
        columns, stats, learn_timings = self.learner.learn(
            samples.iteration, [c.batch for c in samples.chunks], [c.scoring.rewards for c in samples.chunks], selected
        )
        timings.update(learn_timings)
        return Learned(columns, stats)

    def sync_weights(self) -> None:
        """Queue the new weights on every worker behind the generation already in flight."""
        self.weights.queue()

    def evaluate_if_due(self, iteration: int) -> None:
        """After the iterations `eval.every` names and the last: the held-out prompts queued on the workers
        right behind the weights this iteration's update made (collected by `record_metrics`)."""
        self.collector.evaluations.after(iteration, self.last_iteration)

    def archive_iteration(self, samples: Samples, learned: Learned) -> None:
        self.record.archive_iteration(samples, learned)

    def record_metrics(self, samples: Samples, learned: Learned, timings: dict[str, float]) -> dict:
        """The iteration's manifest entry (after a start for each learner rebuild), then a checkpoint committed
        if its background write is done (its manifest entry names the iteration's), then the metrics line."""
        version = self.learner.updates  # what the sync just queued (a rebuilt learner's, if it was)
        evaluation = self.collector.evaluations.take(samples.iteration, self.last_iteration, timings)
        self.record.trained(samples, version, self.learner.rebuilds())
        self.checkpoints.commit_written(self.learner, wait=False)
        restarts = {"rollout": self.workers.restarts, "learner": self.learner.restarts}
        return self.record.record(
            samples,
            learned,
            timings,
            version=version,
            sync_gap=self.weights.gap,
            restarts=restarts,
            last_iteration=self.last_iteration,
            checkpoint_write_s=self.checkpoints.write_seconds(),
            evaluation=evaluation,
        )

    def checkpoint_if_due(self, samples: Samples, timings: dict[str, float]) -> None:
        """Every `checkpoint_every` iterations and after the last: staged while the loop waits, then written
        in the background (`time/checkpoint` is the wait)."""
        iteration = samples.iteration
        if (iteration + 1) % self.cfg.checkpoint_every and iteration != self.last_iteration:
            return
        start = time.perf_counter()
        # The next iteration's weights are queued already: its generation runs while the learner saves.
        if iteration + 1 <= self.last_iteration:
            self.collector.launch(iteration + 1, trains_at=self.learner.updates)
        self.record.flush_archive()  # every trained iteration archived before a checkpoint says it was trained
        self.checkpoints.save(iteration, {"sampler": samples.sampler, "run_id": self.record.run_id}, self.learner)
        timings["checkpoint"] = time.perf_counter() - start

    def stop_after(self, samples: Samples) -> None:
        """The caller ends the run after this iteration: its checkpoint saved (unless it was due and is), and
        the generation launched for later iterations left to die with the workers."""
        iteration = samples.iteration
        if (iteration + 1) % self.cfg.checkpoint_every and iteration != self.last_iteration:
            self.record.flush_archive()
            self.checkpoints.save(iteration, {"sampler": samples.sampler, "run_id": self.record.run_id}, self.learner)
        print(f"stopped after iteration {iteration}: on_iteration returned False", file=self.record.log, flush=True)

    def close(self, *, failed: bool = False) -> None:
        """Commit the checkpoint being written (unless the job failed) and close the run's files, then release
        the actors."""
        try:
            if not failed and self.learner is not None:
                self.checkpoints.commit_written(self.learner, wait=True)
                self.record.learner_rebuilt(self.learner.rebuilds())  # a rank lost in that last wait
            if not failed and self.collector is not None:
                self.collector.evaluations.finish()
        finally:
            try:
                if self.collector is not None:
                    self.collector.evaluations.close()
            finally:
                try:
                    self.record.close(failed=failed)
                finally:
                    self._release()

    # -- helpers -----------------------------------------------------------------------------------

    def _release(self) -> None:
        """Kill what was started (all of it, or what a start that failed half-way got to) and free the run
        directory. Results still in flight die with their actors: Ray would report each as an "unhandled
        error", so it is told not to."""
        os.environ["RAY_IGNORE_UNHANDLED_ERRORS"] = "1"
        if self.nodes is not None:
            self.nodes.close()
        for group in (self.workers, self.learner, self.rewards):
            if group is not None:
                group.release()
        self.record.release()
