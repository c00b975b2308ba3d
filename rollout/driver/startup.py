"""The start-up steps `rollout run` and `rollout generate` share, in the order they take them.

read_data (config rules, the reward and env sections, prompts rendered: bad input fails before Ray starts)
-> lock the run directory -> start_cluster (driver log, config.yaml, Ray, devices, fit check)

`rollout run` reads its data while Ray starts (`read_data_starting_ray`): the config's rules still fail before
Ray starts, bad data once it is up (and stopped again), and nothing is written to the run directory first.
"""

from __future__ import annotations

import datetime as dt
import logging
import math
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray

from contracts.builtin_model import load_tokenizer, resolve_model_path
from contracts.config import ConfigError, JobConfig
from contracts.config.load import check, to_yaml
from contracts.console import configure_driver
from contracts.rendering import PromptRenderer
from reward.checks import check_reward_config
from rollout.driver import stopping
from rollout.driver.prompts import Prompts, check_source, job_prompts
from rollout.driver.resources import actor_requests, check_fits, node_resources, resolve_devices
from rollout.driver.run_lock import RunLock
from rollout.environments.registry import check_environment


@dataclass
class RunData:
    """The job's prompts, rendered by the tokenizer of the model it starts from."""

    base_model: str  # a directory: the builtin tiny model is built on first use
    tokenizer: Any
    prompts: Prompts  # in data order
    eval_prompts: Prompts | None = None  # the held-out ones (`eval.prompts`), when asked for


def read_data(cfg: JobConfig, log, *, prompts_needed: int = 0, evaluation: bool = False) -> RunData:
    """Config rules, the reward section (rule names and params, users' rule modules, the reward model's
    directory), the environment (`env.name` and `env.params`) and the prompts, checked before anything
    starts: bad data fails here, in seconds, and leaves nothing in the run directory (a table too large to
    read whole at load has its columns checked here, its rows as they are drawn). With an environment,
    each prompt is the one its episode opens with (`Environment.opening`)."""
    check(cfg)  # devices are checked against the cluster once it is joined
    # The learner's registries import torch (seconds): `rollout run` pays it here, while Ray starts.
    from learner.estimators import check_learner_names

    check_learner_names(cfg.learner, cfg.rollout.n_samples)
    check_reward_config(cfg.reward)  # rule names and params, user rules imported, the reward model
    environment = check_environment(cfg.env)  # the class imported and one instance made from env.params
    base_model = resolve_model_path(cfg.model.path)
    tokenizer = load_tokenizer(cfg.model.path)  # imports transformers: only the commands that start a job pay it
    prompts = job_prompts(
        cfg.data,
        cfg.seed,
        PromptRenderer(tokenizer, cfg.model.max_prompt_tokens),
        log=log,
        opening=None if environment is None else environment.opening,
        observation_role=cfg.env.observation_role,
    )
    usable = len(prompts) - len(prompts.bad)
    if prompts_needed > usable:
        raise ConfigError(
            f"rollout.prompts_per_iteration ({prompts_needed}) exceeds the {usable} usable "
            f"prompts of data.prompts ({cfg.data.prompts}): lower it, or give more prompts"
        )
    held_out = None
    if evaluation and cfg.eval.prompts is not None:
        from rollout.driver.evaluation import eval_prompts

        held_out = eval_prompts(cfg, tokenizer, log)
    return RunData(base_model, tokenizer, prompts, held_out)


def read_data_starting_ray(cfg: JobConfig, run_dir: Path, log, *, learner: bool, prompts_needed: int = 0) -> RunData:
    """`read_data` in a thread while Ray starts (`init_ray`): the data's imports (transformers), tokenizer and
    prompts take seconds of this process, Ray's start mostly waits on its own processes. The thread first
    configures the driver's logging, which imports transformers too: Ray starts once that is done, its
    filters in place, and from there the two import no module in common (a lazy package such as
    transformers, imported from both threads at once, can fail with "cannot import name").

    The config's own rules and the data source's quick checks (the file there and what its name says, a
    table's columns, a task known) come first, so a bad config or source fails before Ray starts; bad rows
    fail once Ray is up, with the Ray started here stopped, and their error comes before Ray's own if both failed.
    Writes nothing in `run_dir`."""
    check(cfg)  # what sizes Ray's start
    check_source(cfg.data)  # the data source's quick checks: a missing file or unknown task fails before Ray
    configured = threading.Event()
    outcome: list = []

    def read() -> None:
        try:
            configure_driver(run_dir)
            configured.set()
            outcome.append(read_data(cfg, log, prompts_needed=prompts_needed, evaluation=learner))
        except BaseException as e:  # noqa: BLE001 - raised in the caller's thread
            outcome.append(e)
        finally:
            configured.set()

    reading = threading.Thread(target=read, daemon=True, name="read data")
    started_here = not ray.is_initialized()
    reading.start()
    try:
        configured.wait()
        if not any(isinstance(o, BaseException) for o in outcome):  # failed already: no Ray to start
            init_ray(cfg, learner=learner)
            stopping.install()  # again: ray.init installs its own SIGTERM handler
    except Exception:
        reading.join()
        _raise_if_failed(outcome, started_here)
        raise
    reading.join()
    _raise_if_failed(outcome, started_here)
    return outcome[0]


def _raise_if_failed(outcome: list, stop_ray: bool) -> None:
    if isinstance(outcome[0], BaseException):
        if stop_ray and ray.is_initialized():
            ray.shutdown()
        raise outcome[0]


def lock_run_dir(run_dir: Path, log) -> RunLock:
    """One writer per run directory; taken before anything is written there."""
    lock = RunLock.acquire(run_dir)
    if lock.stale_warning():
        print(lock.stale_warning(), file=log)
    return lock


def start_cluster(cfg: JobConfig, run_dir: Path, *, learner: bool) -> JobConfig:
    """The driver's log and config.yaml in the run directory, Ray joined or started, and the config
    with its devices resolved against the cluster, which is checked to hold every actor: a cluster
    that cannot fails the job here, in seconds, before any model work."""
    configure_driver(run_dir)
    (run_dir / "config.yaml").write_text(to_yaml(cfg))
    init_ray(cfg, learner=learner)
    stopping.install()  # again: ray.init installs its own SIGTERM handler
    cfg = resolve_devices(cfg, ray.cluster_resources())
    check_fits(cfg, ray.cluster_resources(), learner=learner, nodes=node_resources())
    return cfg


def init_ray(cfg: JobConfig, *, learner: bool) -> None:
    """Join the cluster at ray.address / RAY_ADDRESS, else start a local Ray sized for the job's actors."""
    if ray.is_initialized():
        return
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True, logging_level=logging.WARNING)
        return
    # Ray's CPU count is a scheduling budget, not a thread limit: generation, reward and learning
    # take turns, so a 2-core machine can host the whole job.
    needed = sum(count * each["CPU"] for _, count, each in actor_requests(cfg, learner=learner))
    num_cpus = cfg.ray.num_cpus or max(os.cpu_count() or 1, math.ceil(needed))
    # "local", not None: with None, Ray joins any cluster `ray start` left on this machine.
    ray.init(
        address="local",
        num_cpus=num_cpus,
        include_dashboard=False,
        log_to_driver=True,
        logging_level=logging.WARNING,
        _metrics_export_port=cfg.ray.metrics_export_port,
        # No idle workers started ahead: each spends a second or more of the cores the engines and the
        # learner start on, and on 2 cores the run's actors were up no sooner with them (19.4-21.2 s to the
        # first iteration of the default job against 20.1-20.6 s without).
        _system_config={"enable_worker_prestart": False, "prestart_worker_first_driver": False},
    )


def run_id(run_dir: Path, name: str) -> str:
    """Fixed at a run's first start and kept by resumes."""
    path = run_dir / "run_id"
    if path.exists():
        return path.read_text().strip()
    run_id = f"{name}-{dt.datetime.now(dt.timezone.utc):%Y%m%d-%H%M%S}"
    path.write_text(run_id)
    return run_id
