"""`rollout plan`: the actors, their placement and the memory per GPU, checked against cluster.yaml."""

from pathlib import Path

import yaml

from contracts.config.load import load_config
from rollout.cli import main
from rollout.offline.plan import format_plan, make_plan

ROOT = Path(__file__).resolve().parents[1]
CLUSTER_CONFIG = str(ROOT / "configs" / "cluster-qwen-0.5b.yaml")


def cluster_yaml_resources() -> dict[str, float]:
    """What `ray up cluster.yaml` brings at its largest: the head plus max_workers of each worker type."""
    spec = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    total = {"CPU": 0.0, "GPU": 0.0}
    for name, node in spec["available_node_types"].items():
        count = 1 if name == spec["head_node_type"] else node["max_workers"]
        for resource in total:
            total[resource] += count * node["resources"].get(resource, 0)
    return total


def test_the_cluster_config_fits_the_cluster_yaml_describes():
    cluster = cluster_yaml_resources()
    assert cluster == {"CPU": 40.0, "GPU": 4.0}
    plan = make_plan(load_config(CLUSTER_CONFIG), cluster, gpu_memory_gb=24)  # g5.2xlarge: one 24 GB A10G
    assert plan.problems == [], plan.problems
    text = format_plan(plan)
    assert "rollout worker       3         1         1" in text and "learner rank         1" in text
    assert "fits: the cluster holds every actor at once" in text


def test_a_plan_the_cluster_cannot_hold_names_what_is_missing():
    cfg = load_config(CLUSTER_CONFIG, ["rollout.num_workers=4"])
    plan = make_plan(cfg, cluster_yaml_resources(), gpu_memory_gb=24)
    assert any("needs 5 GPUs" in p and "the cluster has 4" in p for p in plan.problems), plan.problems


def test_memory_per_gpu_without_a_cluster_and_a_gpu_too_small(capsys):
    assert main(["plan", "--config", CLUSTER_CONFIG]) == 0
    out = capsys.readouterr().out
    assert "0.494B parameters" in out and "rollout worker (per GPU): weights 0.92" in out
    assert "learner rank (per GPU): 19.2" in out
    assert main(["plan", "--config", CLUSTER_CONFIG, "--gpu-memory-gb", "16"]) == 1
    out = capsys.readouterr().out
    assert "does not fit:" in out and "raise learner.num_ranks" in out


def test_a_reward_model_on_gpus_is_in_the_plan():
    cfg = load_config(CLUSTER_CONFIG, ["reward.model.path=/models/rm", "reward.model.num_gpus=1"])
    plan = make_plan(cfg, {"CPU": 40.0, "GPU": 4.0}, gpu_memory_gb=24)
    assert "reward worker        2       0.5         1" in format_plan(plan)
    assert any("needs 6 GPUs" in p and "reward.model.num_gpus" in p for p in plan.problems), plan.problems


def test_auto_devices_follow_the_cluster_not_the_drivers_torch():
    import pytest

    from contracts.config import ConfigError
    from rollout.driver.resources import resolve_devices

    auto = load_config(None, ["rollout.device=auto", "learner.device=auto"])
    on_gpus = resolve_devices(auto, {"CPU": 40.0, "GPU": 4.0})  # a driver on a GPU-less head, GPU workers
    assert (on_gpus.rollout.device, on_gpus.learner.device) == ("cuda", "cuda")
    assert resolve_devices(auto, {"CPU": 8.0}).learner.device == "cpu"
    with pytest.raises(ConfigError, match="learner.device is cuda but the cluster has no GPUs"):
        resolve_devices(load_config(CLUSTER_CONFIG), {"CPU": 8.0})
    assert (
        resolve_devices(load_config(CLUSTER_CONFIG, ["ray.fail_if_short=false"]), {"CPU": 8.0}).learner.device == "cuda"
    )  # an autoscaling cluster adds its GPU nodes on demand
