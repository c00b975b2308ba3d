"""What the job's actors ask Ray for, checked against the cluster before any actor is started.

A request the cluster cannot hold would leave an actor pending forever; this turns it into an error
at start-up that names what is needed, what exists and the settings that change it.
"""

from __future__ import annotations

import msgspec

from learner.device import resolve_device
from rollout.config import ConfigError, JobConfig


def resolve_devices(cfg: JobConfig, cluster: dict[str, float]) -> JobConfig:
    """The config with `auto` devices decided by the cluster: cuda when it has GPUs. A driver that
    `ray job submit` ran on a GPU-less head so sees the workers' GPUs, not its own torch's. An explicit
    cuda on a cluster without GPUs is an error (unless ray.fail_if_short is off: nodes may come)."""
    gpus = cluster.get("GPU", 0.0) > 0
    changes, problems = {}, []
    for section in ("rollout", "learner"):
        device = getattr(cfg, section).device
        if device == "auto":
            changes[section] = msgspec.structs.replace(getattr(cfg, section), device="cuda" if gpus else "cpu")
        elif device == "cuda" and not gpus and cfg.ray.fail_if_short:
            problems.append(f"{section}.device is cuda but the cluster has no GPUs: set it to auto or cpu, "
                            "or add GPU nodes (ray.fail_if_short=false if they come on demand)")
    if problems:
        raise ConfigError("the cluster cannot hold the job:\n  - " + "\n  - ".join(problems))
    return msgspec.structs.replace(cfg, **changes)


def actor_requests(cfg: JobConfig, *, learner: bool = True) -> list[tuple[str, int, dict[str, float]]]:
    """(what, how many, resources each) for every kind of actor the job starts."""
    rollout_gpus = cfg.rollout.num_gpus_per_worker if resolve_device(cfg.rollout.device) == "cuda" else 0
    requests = [("rollout worker", cfg.rollout.num_workers,
                 {"CPU": cfg.rollout.num_cpus_per_worker, "GPU": rollout_gpus}),
                ("reward worker", cfg.reward.num_workers,
                 {"CPU": cfg.reward.num_cpus_per_worker,
                  "GPU": cfg.reward.model.num_gpus if cfg.reward.model is not None else 0.0})]
    if learner:
        learner_gpus = 1.0 if resolve_device(cfg.learner.device) == "cuda" else 0.0
        requests.append(("learner rank", cfg.learner.num_ranks,
                         {"CPU": cfg.learner.num_cpus_per_rank, "GPU": learner_gpus}))
    return requests


KNOBS = {"CPU": "rollout.num_cpus_per_worker, reward.num_cpus_per_worker, learner.num_cpus_per_rank, "
                "rollout.num_workers, reward.num_workers or learner.num_ranks",
         "GPU": "rollout.num_gpus_per_worker, rollout.num_workers, reward.model.num_gpus or learner.num_ranks"}


def check_fits(cfg: JobConfig, cluster: dict[str, float], *, learner: bool = True) -> None:
    """Raise ConfigError when the cluster's total resources cannot hold every actor at once."""
    requests = actor_requests(cfg, learner=learner)
    problems = []
    for resource in ("CPU", "GPU"):
        needed = sum(count * each[resource] for _, count, each in requests)
        have = cluster.get(resource, 0.0)
        if needed > have + 1e-9:
            parts = ", ".join(f"{count} {what}{'s' if count > 1 else ''} x {each[resource]:g}"
                              for what, count, each in requests if each[resource])
            problems.append(f"the job needs {needed:g} {resource}s ({parts}) and the cluster has {have:g}: "
                            f"lower {KNOBS[resource]}, or add nodes")
    if problems and cfg.ray.fail_if_short:
        raise ConfigError("the cluster cannot hold the job:\n  - " + "\n  - ".join(problems) +
                          "\n  (on a cluster that adds nodes on demand, set ray.fail_if_short=false)")
