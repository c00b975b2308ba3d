"""Held-out evaluation: the `eval` section's prompts generated on the rollout workers with the weights they
serve, scored (by the run's reward or the section's own rules), archived under `RUN/eval/` (the archive's
schema, `trained` false: never trained on) and summed up as `eval/*` figures (`eval_metrics`).

`Evaluator` is a plain class over the workers: the job launches an evaluation right behind a weight sync
(`launch`) and collects it later (`collect`), so with rollout.max_staleness >= 1 it runs while the learner
updates; `rollout eval` makes one on its own workers (`evaluate`).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import msgspec
import numpy as np
import ray

from contracts.config import JobConfig, RewardConfig
from contracts.config.evaluation import eval_sampling
from contracts.files import append_text
from contracts.rendering import PromptRenderer
from reward.checks import check_reward_config
from reward.worker import reward_components
from rollout.actors.launch import Launch
from rollout.actors.reward_workers import RewardWorkers
from rollout.actors.rollout_workers import RolloutWorkers
from rollout.archive import ArchiveWriter
from rollout.archive.columns import archive_batches
from rollout.archive.metadata import run_metadata
from rollout.driver.collector import check_episodes
from rollout.driver.eval_metrics import EVAL_FILE, eval_figures, eval_line, reward_arrays
from rollout.driver.prompts import Prompts, job_prompts
from rollout.environments.registry import check_environment
from rollout.weight_sync.sync import WeightSync

START = -1  # `eval/iteration` of the evaluation before any update


def eval_reward(cfg: JobConfig) -> RewardConfig:
    """What scores the evaluation: the run's reward, or the eval section's rules alone (one worker)."""
    if cfg.eval.rules is None:
        return cfg.reward
    return msgspec.structs.replace(cfg.reward, rules=cfg.eval.rules, model=None, remote=None, num_workers=1)


def eval_prompts(cfg: JobConfig, tokenizer, log) -> Prompts:
    """The held-out prompts, read as `data.prompts` is (a builtin source at seed + 1: not the training draw),
    each one its episode's opening with an environment. Checks the eval section's own rules too."""
    if cfg.eval.rules is not None:
        check_reward_config(eval_reward(cfg))
    environment = check_environment(cfg.env)
    return job_prompts(
        msgspec.structs.replace(cfg.data, prompts=cfg.eval.prompts),
        cfg.seed + 1,
        PromptRenderer(tokenizer, cfg.model.max_prompt_tokens),
        log=log,
        opening=None if environment is None else environment.opening,
        observation_role=cfg.env.observation_role,
    )


def is_due(cfg: JobConfig, iteration: int, last_iteration: int) -> bool:
    """Whether an evaluation follows `iteration`'s update: every `eval.every` iterations, and after the last."""
    ev = cfg.eval
    if ev.prompts is None:
        return False
    return (ev.every > 0 and (iteration + 1) % ev.every == 0) or (ev.at_end and iteration == last_iteration)


@dataclass
class Pending:
    """An evaluation under way: after which iteration (START: before any update), and its generation."""

    iteration: int
    launch: Launch
    after_sync: bool
    started: float


class Evaluator:
    def __init__(
        self,
        cfg: JobConfig,
        prompts: Prompts,
        workers: RolloutWorkers,
        *,
        rewards: RewardWorkers,
        run_dir: Path,
        run_id: str,
        model: str,
        start: dict,
        log,
        weights: WeightSync | None = None,
    ):
        """`rewards`: the run's reward workers; with `eval.rules` the evaluator starts its own (one worker).
        `start`: the manifest entry of this start, for the eval archive's metadata."""
        self.cfg, self.prompts, self.workers, self.weights, self.log = cfg, prompts, workers, weights, log
        self.run_id = run_id
        self.rows = prompts.usable()[: cfg.eval.max_prompts]
        self.sampling = eval_sampling(cfg.eval, cfg.rollout.sampling)
        reward = eval_reward(cfg)
        if cfg.eval.rules is not None:
            rewards = RewardWorkers(reward, start_timeout_s=cfg.ray.actor_start_timeout_s, log=log, name="eval-reward")
            rewards.wait_started()
        self.rewards = rewards
        archived = msgspec.structs.replace(
            cfg, reward=reward, rollout=msgspec.structs.replace(cfg.rollout, sampling=self.sampling)
        )
        self.archive = ArchiveWriter(
            run_dir / "eval",
            {**run_metadata(archived, run_id, model, start, learner=False), "eval": "true"},
            reward_components(reward),
            batch_rows=cfg.archive.batch_rows,
            rows_per_file=cfg.archive.rows_per_file,
        )

    def launch(self, iteration: int) -> Pending:
        """Queue the evaluation after `iteration` (START: before any update) on the workers, behind the weight
        sync queued last, if any: it runs on the weights that sync brings."""
        tasks = [self.prompts.task(i) for i in self.rows]
        records = {self.prompts.record(i).prompt_id: self.prompts.record(i) for i in self.rows}

        def score(batch, chunk_tasks):
            ids = dict.fromkeys(t.prompt_id for t in chunk_tasks)
            return self.rewards.score(batch, [self.prompts.by_id(i) for i in ids])

        launch = self.workers.submit(
            tasks,
            run_id=self.run_id,
            iteration=max(iteration, 0),
            score=score,
            records=records,
            sampling=self.sampling,
            n_samples=self.cfg.eval.n_samples,
            what=self._what(iteration),
        )
        after_sync = self.weights is not None and self.weights.queued()
        return Pending(iteration, launch, after_sync, time.perf_counter())

    def collect(self, pending: Pending) -> dict:
        """Wait for the evaluation, archive its rows and return its figures (`eval/*`, with `eval/iteration`,
        `eval/policy_version` and `time/eval`, its seconds from launch to here); each evaluation is also a
        line of RUN/eval/metrics.jsonl and the console's."""
        if pending.after_sync:
            self.weights.confirm()
        what = self._what(pending.iteration)
        chunks = list(pending.launch.chunks())
        check_episodes(self.cfg.env, max(pending.iteration, 0), [c.summary for c in chunks])
        rewards, _ = self.rewards.scores([c.scoring for c in chunks], self.cfg.rollout.iteration_timeout_s, what)
        timeout = self.cfg.rollout.iteration_timeout_s
        batches = ray.get([c.batch for c in chunks], timeout=timeout)
        self.archive.write_later(lambda: archive_batches(batches, rewards, None, self.archive.components))
        prompt_ids = [p for b in batches for p in b.column("prompt_id").to_pylist()]
        total, components = reward_arrays(rewards)
        tokens = sum(c.summary.generated_tokens for c in chunks)
        ev = self.cfg.eval
        figures = eval_figures(prompt_ids, total, components, tokens, ev.n_samples, ev.correct_threshold)
        versions = [c.summary.policy_version for c in chunks]
        figures["eval/iteration"] = pending.iteration
        figures["eval/policy_version"] = int(min(versions)) if versions else 0
        figures["time/eval"] = time.perf_counter() - pending.started
        self.write(figures)
        return figures

    def write(self, figures: dict) -> None:
        """RUN/eval/metrics.jsonl's line and the console's."""
        finite = {k: (None if isinstance(v, float) and not np.isfinite(v) else v) for k, v in figures.items()}
        append_text(self.archive.directory / EVAL_FILE, json.dumps(finite) + "\n")
        print(eval_line(figures), file=self.log, flush=True)

    def flush(self) -> None:
        self.archive.flush()

    def close(self) -> None:
        """Write what is queued; release the evaluator's own reward workers."""
        try:
            self.archive.close()
        finally:
            if self.cfg.eval.rules is not None:  # its own reward workers
                self.rewards.release()

    def _what(self, iteration: int) -> str:
        return "the evaluation at the start" if iteration == START else f"the evaluation after iteration {iteration}"


class Evaluations:
    """When the job evaluates, and on which metrics line each evaluation lands; nothing while `evaluator` is
    None (no eval section)."""

    def __init__(self, cfg: JobConfig, evaluator: Evaluator | None = None):
        self.cfg, self.evaluator = cfg, evaluator
        self.pending: list[Pending] = []  # launched, not yet collected, oldest first

    def at_start(self, iteration: int) -> None:
        """Before any update (a fresh run, `eval.at_start`): queued behind iteration 0's generation, on the same
        weights, so it runs while the learner makes its first update."""
        if self.evaluator is not None and iteration == 0 and self.cfg.eval.at_start:
            self.pending.append(self.evaluator.launch(START))

    def after(self, iteration: int, last_iteration: int) -> None:
        """After the iterations `eval.every` names and the last: queued right behind the weight sync of the
        iteration's update."""
        if self.evaluator is not None and is_due(self.cfg, iteration, last_iteration):
            self.pending.append(self.evaluator.launch(iteration))

    def take(self, iteration: int, last_iteration: int, timings: dict[str, float]) -> dict | None:
        """The oldest evaluation this iteration's line takes (at most one): the start's on iteration 0's, the
        one after iteration i on i's or, with rollout.max_staleness >= 1, on i + 1's when that line has none of
        its own (it ran behind the generation already in flight, while the learner updated on i + 1). Two due
        on one line (the start's and eval.every 1's) each move one line on; one left after the last line is
        in RUN/eval/metrics.jsonl only (`finish`). `timings["eval_wait"]`: how long the loop waited for it."""
        if not self.pending:
            return None
        pending = self.pending[0]
        later = pending.iteration + 1
        ahead = (
            self.cfg.rollout.max_staleness > 0
            and pending.iteration != START
            and later <= last_iteration
            and not is_due(self.cfg, later, last_iteration)
        )
        if ahead and pending.iteration == iteration:
            return None
        self.pending.pop(0)
        start = time.perf_counter()
        figures = self.evaluator.collect(pending)
        timings["eval_wait"] = figures["time/eval_wait"] = time.perf_counter() - start
        return figures

    def finish(self) -> None:
        """Collect what no line took (the run ended well)."""
        while self.pending:
            self.evaluator.collect(self.pending.pop(0))

    def close(self) -> None:
        if self.evaluator is not None:
            self.evaluator.close()


def evaluate(
    cfg: JobConfig,
    model: str,
    out: Path,
    *,
    log,
    iteration: int = START,
    policy_version: int | None = None,
    prompts: Prompts | None = None,
    tokenizer=None,
) -> dict:
    """One evaluation of `model` (a directory or builtin:) on its own rollout and reward workers, archived in
    OUT/eval with its line in OUT/eval/metrics.jsonl: `rollout eval`, and the Python API's `evaluate`.
    `iteration`: the one the weights were saved after (a checkpoint's), START for a base model;
    `policy_version`: the weights' (a checkpoint's, from its run's manifest). Starts (or
    joins) Ray; the workers are released however it ends."""
    from contracts.builtin_model import load_tokenizer, resolve_model_path
    from rollout.driver.startup import start_cluster

    path = resolve_model_path(model)
    if prompts is None:
        prompts = eval_prompts(cfg, tokenizer or load_tokenizer(model), log)
    out.mkdir(parents=True, exist_ok=True)
    cfg = start_cluster(cfg, out, learner=False)  # the driver's log, config.yaml, Ray, devices resolved
    run_id = f"{cfg.run_name}-eval"
    start = {"purpose": "rollout eval", "model": model}
    rewards = workers = evaluator = None
    try:
        rewards = RewardWorkers(cfg.reward, start_timeout_s=cfg.ray.actor_start_timeout_s, log=log)
        workers = RolloutWorkers.of_job(cfg, path, log=log)
        rewards.wait_started()
        evaluator = Evaluator(
            cfg, prompts, workers, rewards=rewards, run_dir=out, run_id=run_id, model=path, start=start, log=log
        )
        figures = evaluator.collect(evaluator.launch(iteration))
        if policy_version is not None:  # the engine counts the versions it loaded, from 0
            figures["eval/policy_version"] = policy_version
        figures["eval/model"] = model
        return figures
    finally:
        if evaluator is not None:
            evaluator.close()
        for group in (workers, rewards):
            if group is not None:
                group.release()


def checkpoint_of(run: Path | None = None, checkpoint: Path | None = None) -> tuple[Path, Path | None]:
    """(the checkpoint directory, its run directory if it has one): `checkpoint` itself, or `run`'s newest whole
    one (`checkpoints/latest`, else the newest that verifies). UserError when there is none."""
    from contracts.errors import UserError
    from learner import checkpoint as learner_checkpoint
    from rollout.driver.checkpoints import CHECKPOINTS, LATEST

    if checkpoint is None:
        root = Path(run) / CHECKPOINTS
        named = (root / LATEST).read_text().strip() if (root / LATEST).exists() else ""
        candidates = ([root / named] if named else []) + sorted(
            (p for p in root.glob("iter-*") if p.is_dir() and p.suffix != ".partial"), reverse=True
        )
        found = next((c for c in candidates if learner_checkpoint.problem(c) is None), None)
        if found is None:
            raise UserError(f"{run}: no whole checkpoint in {root}")
        return found, Path(run)
    checkpoint = Path(checkpoint)
    problem = learner_checkpoint.problem(checkpoint)
    if problem is not None:
        raise UserError(f"{checkpoint}: not a whole checkpoint ({problem})")
    parent = checkpoint.parent.parent
    return checkpoint, parent if (parent / "config.yaml").exists() else None


def version_at(run: Path | None, iteration: int) -> int | None:
    """The policy version iteration's update made, from the run's manifest; None when it does not say."""
    path = None if run is None else Path(run) / "manifest.json"
    if path is None or not path.is_file():
        return None
    entries = [e for e in json.loads(path.read_text()).get("iterations", []) if e.get("iteration") == iteration]
    return entries[-1].get("policy_version") if entries else None
