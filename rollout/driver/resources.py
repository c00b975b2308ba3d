"""What the job's actors ask Ray for, checked against the cluster before any actor is started.

A request the cluster cannot hold would leave an actor pending forever; this turns it into an error
at start-up that names what is needed, what exists and the settings that change it.
"""

from __future__ import annotations

import msgspec

from contracts.config import ConfigError, JobConfig
from contracts.device import resolve_device


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
            problems.append(
                f"{section}.device is cuda but the cluster has no GPUs: set it to auto or cpu, "
                "or add GPU nodes (ray.fail_if_short=false if they come on demand)"
            )
    if problems:
        raise ConfigError("the cluster cannot hold the job:\n  - " + "\n  - ".join(problems))
    return msgspec.structs.replace(cfg, **changes)


def actor_requests(cfg: JobConfig, *, learner: bool = True) -> list[tuple[str, int, dict[str, float]]]:
    """(what, how many, resources each) for every kind of actor the job starts."""
    rollout_gpus = cfg.rollout.num_gpus_per_worker if resolve_device(cfg.rollout.device) == "cuda" else 0
    requests = [
        ("rollout worker", cfg.rollout.num_workers, {"CPU": cfg.rollout.num_cpus_per_worker, "GPU": rollout_gpus}),
        (
            "reward worker",
            cfg.reward.num_workers,
            {
                "CPU": cfg.reward.num_cpus_per_worker,
                "GPU": cfg.reward.model.num_gpus if cfg.reward.model is not None else 0.0,
            },
        ),
    ]
    if cfg.eval.prompts is not None and cfg.eval.rules is not None:  # the evaluation's own rules
        requests.append(("eval reward worker", 1, {"CPU": cfg.reward.num_cpus_per_worker, "GPU": 0.0}))
    if learner:
        learner_gpus = 1.0 if resolve_device(cfg.learner.device) == "cuda" else 0.0
        requests.append(
            ("learner rank", cfg.learner.num_ranks, {"CPU": cfg.learner.num_cpus_per_rank, "GPU": learner_gpus})
        )
    return requests


KNOBS = {
    "CPU": "rollout.num_cpus_per_worker, reward.num_cpus_per_worker, learner.num_cpus_per_rank, "
    "rollout.num_workers, reward.num_workers or learner.num_ranks",
    "GPU": "rollout.num_gpus_per_worker, rollout.num_workers, reward.model.num_gpus or learner.num_ranks",
}


def check_fits(
    cfg: JobConfig, cluster: dict[str, float], *, learner: bool = True, nodes: dict[str, dict[str, float]] | None = None
) -> None:
    """Raise ConfigError when the cluster cannot hold every actor at once: by its totals, then (given
    `nodes`, each node's resources by its name) with every actor on one node, as Ray places them."""
    requests = actor_requests(cfg, learner=learner)
    problems = []
    for resource in ("CPU", "GPU"):
        needed = sum(count * each[resource] for _, count, each in requests)
        have = cluster.get(resource, 0.0)
        if needed > have + 1e-9:
            parts = ", ".join(
                f"{count} {what}{'s' if count > 1 else ''} x {each[resource]:g}"
                for what, count, each in requests
                if each[resource]
            )
            problems.append(
                f"the job needs {needed:g} {resource}s ({parts}) and the cluster has {have:g}: "
                f"lower {KNOBS[resource]}, or add nodes"
            )
    if not problems and nodes and len(nodes) > 1:
        stranded = unplaced(requests, nodes)
        if stranded:
            what, each = stranded
            sizes = ", ".join(f"{name} {r.get('CPU', 0):g} CPU / {r.get('GPU', 0):g} GPU" for name, r in nodes.items())
            problems.append(
                f"the totals fit, but no node has room for a {what} ({each['CPU']:g} CPU, "
                f"{each['GPU']:g} GPU) beside the other actors: an actor runs on one node, and the "
                f"nodes are {sizes}; lower {KNOBS['CPU' if each['CPU'] else 'GPU']}, or add a larger node"
            )
    if problems and cfg.ray.fail_if_short:
        raise ConfigError(
            "the cluster cannot hold the job:\n  - "
            + "\n  - ".join(problems)
            + "\n  (on a cluster that adds nodes on demand, set ray.fail_if_short=false)"
        )


def unplaced(requests, nodes: dict[str, dict[str, float]], budget: int = 100_000):
    """(what, resources) of an actor that no placement of all of them on the nodes has room for, or
    None when they all fit (or when the search gives up after `budget` steps: no false alarm).
    Largest first, each onto a node with room, backtracking on a dead end."""
    actors = sorted(
        ((what, each) for what, count, each in requests for _ in range(count)),
        key=lambda a: (a[1]["GPU"], a[1]["CPU"]),
        reverse=True,
    )
    free = [[r.get("CPU", 0.0), r.get("GPU", 0.0)] for r in nodes.values()]
    steps = 0
    deepest = 0

    def place(i: int) -> bool | None:
        nonlocal steps, deepest
        deepest = max(deepest, i)
        if i == len(actors):
            return True
        steps += 1
        if steps > budget:
            return None
        cpu, gpu = actors[i][1]["CPU"], actors[i][1]["GPU"]
        tried = set()
        for room in free:
            if (room[0], room[1]) in tried or room[0] + 1e-9 < cpu or room[1] + 1e-9 < gpu:
                continue  # a node with the same room as one tried already ends the same way
            tried.add((room[0], room[1]))
            room[0] -= cpu
            room[1] -= gpu
            found = place(i + 1)
            room[0] += cpu
            room[1] += gpu
            if found is not False:
                return found
        return False

    return actors[deepest] if place(0) is False else None


def node_resources() -> dict[str, dict[str, float]]:
    """Each live node's CPU and GPU, by its address (and id, where two share an address)."""
    import ray

    nodes = {}
    for node in ray.nodes():
        if node.get("Alive"):
            name = node.get("NodeManagerAddress", "node")
            name = name if name not in nodes else f"{name} ({node['NodeID'][:8]})"
            nodes[name] = {r: float(node.get("Resources", {}).get(r, 0.0)) for r in ("CPU", "GPU")}
    return nodes
