"""The collector on stand-in workers: `rollout generate`'s pass fails on an environment that failed too many
episodes, as `rollout run`'s iterations do; dynamic sampling says it fell short once per run."""

import io
from types import SimpleNamespace

import pyarrow as pa
import pytest

from contracts.config.load import load_config
from rollout.actors.launch import Chunk
from rollout.actors.reward_workers import Scoring
from rollout.driver.collector import Collector, EnvironmentFailure
from rollout.driver.prompts import Prompts, PromptSampler
from rollout.generation.worker import GenerationSummary


class Workers:
    """Each prompt a chunk of `n` samples; `errors[i]`: how many of prompt i's episodes failed."""

    def __init__(self, n: int, errors: dict[int, int], rewards=lambda i: [float(i)] * 2):
        self.n, self.errors, self.rewards = n, errors, rewards

    def submit(self, tasks, *, run_id, iteration, score, records):
        chunks = []
        for task in tasks:
            i = int(task.prompt_id[1:])
            failed = self.errors.get(i, 0)
            summary = GenerationSummary(
                "rollout-0", 0.1, self.n, 10, self.n, 0, env_errors=failed, first_env_error="boom" if failed else None
            )
            batch = pa.record_batch({"reward": self.rewards(i)})  # what the stand-in scorer returns
            chunks.append(Chunk(batch, summary, score(batch, [task])))
        return SimpleNamespace(chunks=lambda: iter(chunks))


class Rewards:
    def __init__(self):
        self.records = []

    def score(self, batch, records):
        self.records.append([r.prompt_id for r in records])
        return Scoring(batch, {"total": 0.01}, 0)

    def scores(self, scorings, timeout, what):
        return [s.rewards for s in scorings], {"reward_latency/total": sum(s.latency["total"] for s in scorings)}


class Renderer:
    max_prompt_tokens = 100

    def render(self, record, messages=None):
        return SimpleNamespace(prompt_id=record.prompt_id)


def data(prompts: int):
    records = [SimpleNamespace(prompt_id=f"p{i}") for i in range(prompts)]
    return SimpleNamespace(prompts=Prompts("test", prompts, records.__getitem__, Renderer()))


def generate_collector(errors: dict[int, int], *overrides: str):
    cfg = load_config(None, ["env.name=calculator", "rollout.n_samples=2", *overrides])
    rewards = Rewards()
    return Collector(cfg, data(4), Workers(2, errors), rewards, run_id="r-generate", log=io.StringIO()), rewards


def test_generate_streams_every_prompt_scored_with_its_records_when_few_episodes_fail():
    collector, rewards = generate_collector({1: 1}, "env.max_error_fraction=0.2")  # 1 of 8 episodes
    streamed = list(collector.stream("generate", "the rewards of `rollout generate`"))
    assert [reward.column("reward").to_pylist() for _, reward in streamed] == [
        [0.0] * 2,
        [1.0] * 2,
        [2.0] * 2,
        [3.0] * 2,
    ]
    assert rewards.records == [["p0"], ["p1"], ["p2"], ["p3"]]


def test_generate_fails_when_more_than_max_error_fraction_of_its_episodes_failed():
    collector, _ = generate_collector({1: 1, 2: 2}, "env.max_error_fraction=0.2")  # 3 of 8 episodes
    streamed = []
    with pytest.raises(EnvironmentFailure) as failure:
        for chunk, _ in collector.stream("generate", "the rewards of `rollout generate`"):
            streamed.append(chunk)
    assert len(streamed) == 4  # every chunk was handed on (and archived) before the check
    assert str(failure.value) == (
        "3 of 8 episodes of iteration 0 failed in environment calculator, more than env.max_error_fraction (0.2); "
        "the first: boom"
    )


def test_dynamic_sampling_runs_its_rounds_and_says_once_that_an_iteration_fell_short():
    cfg = load_config(
        None,
        [
            "rollout.n_samples=2",
            "rollout.prompts_per_iteration=2",
            "rollout.dynamic_sampling.enabled=true",
            "rollout.dynamic_sampling.max_rounds=2",
        ],
    )
    log = io.StringIO()
    workers = Workers(2, {}, rewards=lambda i: [0.0, 1.0] if i == 0 else [1.0, 1.0])  # only prompt 0 has a signal
    sampler = PromptSampler(size=6, seed=0, shuffle=False)
    collector = Collector(cfg, data(6), workers, Rewards(), run_id="r", log=log, sampler=sampler)
    for iteration in range(2):
        collector.launch(iteration)
        samples = collector.collect(iteration, {})
        assert samples.rounds == 2 and samples.selection.kept == 1  # prompt 0 in one round of each
    assert log.getvalue().count("dynamic sampling: iteration 0 has 1 of 2 prompts") == 1
    assert "iteration 1" not in log.getvalue()
