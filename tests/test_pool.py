"""The rollout workers on a local Ray: chunks queued ahead, columnar results, versioned weight syncs (through
the object store) that queue behind generation in flight, timeouts that name the worker."""

import pytest
import ray
from safetensors.torch import load_file

from contracts.config.load import load_config
from contracts.rendering import PromptTask
from contracts.schema import from_record_batch
from rollout.actors.rollout_workers import RolloutWorkers
from rollout.weight_sync.sync import WeightSync

pytestmark = pytest.mark.vllm


@pytest.fixture(scope="module")
def pool(tiny_model_path):
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    cfg = load_config(
        None,
        [
            "rollout.device=cpu",
            "rollout.max_model_len=128",
            "rollout.n_samples=2",
            "rollout.sampling.max_tokens=8",
            "rollout.weight_sync_timeout_s=0.05",
            "rollout.chunks_per_worker=4",
        ],
    )
    workers = RolloutWorkers(
        cfg.rollout, tiny_model_path, dtype="float32", seed=0, start_timeout_s=600, node_wait_timeout_s=600
    )
    yield workers
    ray.shutdown()


@pytest.fixture(scope="module")
def sync(pool):
    """The object-store path with weights given to it (no learner: `queue_weights`)."""
    return WeightSync(pool.cfg, "object_store", dtype="float32", workers=pool, learner=None, node_wait_timeout_s=600)


def tasks(count, start=0):
    return [
        PromptTask(prompt_id=f"p{i}", prompt="x", prompt_ids=[1, 4, 27, 16, 27 + i % 5, 34, 204, 5])
        for i in range(start, start + count)
    ]


def rows(chunks):
    """The samples of collected chunks, as row views (tests only: the service never leaves columns)."""
    return [r for c in chunks for r in from_record_batch(ray.get(c.batch, timeout=120))]


def collect(pool, launch):
    return launch.collect()


def test_chunks_come_back_scored_when_scorers_are_given(pool):
    import msgspec

    from contracts.config import RewardConfig, RuleSpec
    from contracts.formats import parse_prompt
    from rollout.actors.reward_workers import RewardWorkers

    records = {
        f"p{i}": msgspec.structs.replace(parse_prompt({"prompt": "x"}, "sft", f"t:{i}"), prompt_id=f"p{i}")
        for i in range(2)
    }
    scorers = RewardWorkers(RewardConfig(rules=[RuleSpec(name="length", params={"target": 3})]), start_timeout_s=120)

    def score(batch, prompts):
        return scorers.score(batch, [records[t.prompt_id] for t in prompts])

    chunks = collect(pool, pool.submit(tasks(2), run_id="r", iteration=9, score=score))
    for chunk in chunks:
        rewards, latency = ray.get([chunk.scoring.rewards, chunk.scoring.latency], timeout=120)
        assert rewards.num_rows == chunk.summary.samples and set(latency) == {"total", "length"}
    assert sum(c.summary.samples for c in chunks) == 4
    scorers.release()


def test_every_prompt_comes_back_once_with_n_samples_as_columns(pool):
    chunks = collect(pool, pool.submit(tasks(24), run_id="r", iteration=0))
    assert len(chunks) == 4  # chunks_per_worker=4 with one worker
    summaries = [c.summary for c in chunks]
    records = rows(chunks)
    assert sorted((r.prompt_id, r.sample_index) for r in records) == sorted(
        (f"p{i}", s) for i in range(24) for s in range(2)
    )
    assert all(r.policy_version == 0 and r.worker == "rollout-0" for r in records)
    assert all(len(r.response_logprobs) == len(r.response_ids) for r in records)
    assert sum(s.samples for s in summaries) == 48
    assert sum(s.generated_tokens for s in summaries) == sum(len(r.response_ids) for r in records)


def test_a_queued_sync_applies_to_later_chunks_only(pool, sync, tiny_model_path):
    weights = list(load_file(f"{tiny_model_path}/model.safetensors").items())
    pool.cfg = load_config(None, ["rollout.chunks_per_worker=2"]).rollout
    sync.timeout_s = 120
    before = pool.submit(tasks(8), run_id="r", iteration=1)
    sync.queue_weights(1, weights)  # returns at once: the chunks above are still queued or running
    after = pool.submit(tasks(8, start=8), run_id="r", iteration=2)
    sync.confirm()
    assert {r.policy_version for r in rows(collect(pool, before))} == {0}
    assert {r.policy_version for r in rows(collect(pool, after))} == {1}


def test_a_worker_that_misses_a_sync_is_restarted_with_the_new_weights(pool, sync, tiny_model_path, capfd):
    weights = list(load_file(f"{tiny_model_path}/model.safetensors").items())
    pool.cfg = load_config(None, ["rollout.sampling.max_tokens=64", "rollout.chunks_per_worker=1"]).rollout
    sync.timeout_s = 0.05
    busy = pool.submit(tasks(256), run_id="r", iteration=3)  # the worker is busy for a while
    sync.queue_weights(2, weights)
    sync.confirm()  # too late: rollout-0 is restarted, and loads version 2
    assert sync.version == 2 and pool.restarts == 1
    assert "rollout-0: no answer to the weight sync to version 2" in capfd.readouterr().err
    records = rows(collect(pool, busy))  # its chunk is generated again, on the new weights
    assert sorted(r.prompt_id for r in records) == sorted(f"p{i}" for i in range(256) for _ in range(2))
    assert {r.policy_version for r in records} == {2}


def test_an_exception_raised_by_the_engine_is_raised_once_not_generated_again(pool):
    from rollout.errors import exit_code, one_line
    from rollout.runtime.failures import ActorRaised

    restarts = pool.restarts
    vocab = 1 << 20  # far past the tiny model's vocabulary: vLLM refuses the request in the worker
    bad = [PromptTask(prompt_id="bad", prompt="x", prompt_ids=[1, vocab, 5])]
    with pytest.raises(ActorRaised) as raised:
        pool.submit(tasks(3) + bad, run_id="r", iteration=11).collect()
    line = one_line(raised.value)
    assert line.startswith("rollout-0 raised ") and "out of vocabulary" in line and "\n" not in line, line
    assert exit_code(raised.value) == 1
    assert pool.restarts == restarts  # nothing was killed or resubmitted
    assert sum(c.summary.samples for c in pool.submit(tasks(3), run_id="r", iteration=12).collect()) == 6
