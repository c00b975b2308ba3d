"""RolloutWorker actors on a local Ray: results in completion order, versioned weight syncs, timeouts."""

import pytest
import ray
from safetensors.torch import load_file

from rollout.config import load_config
from rollout.pool import WeightSyncError, WorkerPool
from rollout.rendering import PromptTask

pytestmark = pytest.mark.vllm


@pytest.fixture(scope="module")
def pool(tiny_model_path):
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    cfg = load_config(None, ["rollout.device=cpu", "rollout.max_model_len=128", "rollout.n_samples=2",
                             "rollout.sampling.max_tokens=8", "rollout.weight_sync_timeout_s=0.05",
                             "rollout.chunks_per_worker=4"])
    yield WorkerPool(cfg, tiny_model_path)
    ray.shutdown()


def tasks(count):
    return [PromptTask(prompt_id=f"p{i}", prompt="x", prompt_ids=[1, 4, 27, 16, 27 + i % 5, 34, 204, 5])
            for i in range(count)]


def test_every_prompt_comes_back_once_with_n_samples(pool):
    results = list(pool.generate(tasks(24), run_id="r", iteration=0))
    assert len(results) == 4  # chunks_per_worker=4 with one worker
    records = [r for result in results for r in result.records]
    assert sorted((r.prompt_id, r.sample_index) for r in records) == sorted(
        (f"p{i}", s) for i in range(24) for s in range(2))
    assert all(r.policy_version == 0 and r.worker == "rollout-0" for r in records)


def test_sync_sets_the_version_the_samples_carry(pool, tiny_model_path):
    weights = list(load_file(f"{tiny_model_path}/model.safetensors").items())
    pool.cfg = load_config(None, ["rollout.weight_sync_timeout_s=120"])  # a generous timeout here
    pool.sync_weights(1, weights)
    records = [r for result in pool.generate(tasks(4), run_id="r", iteration=1) for r in result.records]
    assert {r.policy_version for r in records} == {1}


def test_a_sync_that_misses_its_timeout_names_the_worker(pool, tiny_model_path):
    weights = list(load_file(f"{tiny_model_path}/model.safetensors").items())
    pool.cfg = load_config(None, ["rollout.weight_sync_timeout_s=0.05", "rollout.sampling.max_tokens=64"])
    busy = pool.workers[0].generate.remote(tasks(256), run_id="r", iteration=2)  # the worker is busy for a while
    with pytest.raises(WeightSyncError, match=r"version 2 timed out after .* on rollout-0"):
        pool.sync_weights(2, weights)
    ray.get(busy)
