"""Episodes: the model's tokens and an environment's kept apart, from the engine to the loss.

A hand-computed two-turn episode through token rewards and GAE (bootstrapping across the environment's
turn), GRPO on episode returns, the learner's columns zero at environment tokens, and the episode runner
on the real in-process engine: turns, masks, observation tokens, time-outs and errors.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from contracts.config import EnvConfig, LearnerConfig, SamplingConfig
from contracts.environment import Environment, StepResult
from contracts.formats import Message, PromptRecord
from contracts.rendering import PromptRenderer
from learner.advantages import token_rewards
from learner.estimators import estimate

# A two-turn episode: model, model | environment, environment | model.
MASK = torch.tensor([[1.0, 1.0, 0.0, 0.0, 1.0]])


def test_gae_over_a_two_turn_episode_bootstraps_across_the_environment_turn():
    rewards = torch.tensor([[-0.1, 0.5, 0.0, 0.0, 1.0]])
    values = torch.tensor([[0.2, 0.4, 9.0, 9.0, 0.3]])  # garbage at the environment's tokens: never read
    cfg = LearnerConfig(estimator="gae", gamma=1.0, lam=0.5)
    advantages, returns = estimate(rewards, values, MASK, torch.zeros(1, dtype=torch.long), cfg)
    # Over the model's tokens [r] = [-0.1, 0.5, 1.0], [V] = [0.2, 0.4, 0.3]:
    #   δ = r_t + V_{t+1} − V_t = [−0.1 + 0.4 − 0.2, 0.5 + 0.3 − 0.4, 1.0 − 0.3] = [0.1, 0.4, 0.7]
    #   A_2 = 0.7; A_1 = 0.4 + 0.5·0.7 = 0.75; A_0 = 0.1 + 0.5·0.75 = 0.475
    torch.testing.assert_close(advantages, torch.tensor([[0.475, 0.75, 0.0, 0.0, 0.7]]))
    torch.testing.assert_close(returns, torch.tensor([[0.675, 1.15, 0.0, 0.0, 1.0]]))


def test_token_rewards_carry_kl_at_model_tokens_the_turn_reward_and_the_score():
    logprobs = torch.tensor([[-1.0, -1.0, -5.0, -5.0, -1.0]])
    ref = torch.tensor([[-1.1, -1.2, -1.0, -1.0, -1.3]])  # k1 kl = [0.1, 0.2, _, _, 0.3]
    turns = torch.tensor([[0.0, 0.5, 0.0, 0.0, 0.0]])  # the environment's reward of turn 1, on its last token
    rewards, kl = token_rewards(torch.tensor([1.0]), logprobs, ref, MASK, 0.5, "k1", turns)
    torch.testing.assert_close(kl, torch.tensor([[0.1, 0.2, 0.0, 0.0, 0.3]]))
    # r_t = −β·kl_t, + the turn's reward, + the score on the last model token
    torch.testing.assert_close(rewards, torch.tensor([[-0.05, -0.1 + 0.5, 0.0, 0.0, -0.15 + 1.0]]))


def test_grpo_compares_episode_returns_turn_rewards_included():
    rewards = torch.tensor([[0.0, 0.5, 0.0, 0.0, 1.0], [0.0, 0.0, 0.0, 0.0, 1.0]])  # returns 1.5 and 1.0
    mask = torch.cat([MASK, MASK])
    cfg = LearnerConfig(estimator="grpo")
    advantages, _ = estimate(rewards, None, mask, torch.tensor([0, 0]), cfg)
    std = float(np.std([1.5, 1.0], ddof=1))
    expected = torch.tensor([0.25, -0.25]) / (std + 1e-6)
    torch.testing.assert_close(advantages[:, 0], expected)
    assert torch.all(advantages[:, 2:4] == 0)  # nothing at the environment's tokens


def episode_records(n=8, seed=0):
    """Rollout records of two-turn episodes: model tokens, 3 environment tokens, model tokens."""
    import datetime as dt

    from contracts.schema import RolloutRecord

    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        first, second = int(rng.integers(1, 5)), int(rng.integers(1, 5))
        response = [int(t) for t in rng.integers(10, 200, first + 3 + second)]
        out.append(
            RolloutRecord(
                run_id="r",
                prompt_id=f"p{i // 2}",
                iteration=0,
                policy_version=0,
                sample_index=i % 2,
                prompt="x",
                response="y",
                prompt_ids=[1, 5, 7],
                response_ids=response,
                response_logprobs=[-1.0] * first + [0.0] * 3 + [-1.0] * second,
                finish_reason="stop",
                worker="w",
                generated_at=dt.datetime.now(dt.timezone.utc),
                reward=float(rng.random()),
                response_mask=[1] * first + [0] * 3 + [1] * second,
                num_turns=2,
                turn_reward_at=[first - 1],
                turn_rewards=[0.25],
            )
        )
    return out


def test_the_learner_leaves_every_column_zero_at_the_environment_tokens(tiny_model_path):
    from learner.learner import Learner
    from learner.samples import SampleBatch

    records = episode_records()
    batch = SampleBatch.from_records(records)
    learner = Learner(LearnerConfig(device="cpu", minibatch_size=8, lr=1e-3), tiny_model_path)
    columns, stats, _ = learner.learn(batch)
    env = batch.response_mask == 0
    for name in ("old_logprobs", "ref_logprobs", "values", "kl", "advantages", "returns"):
        assert np.all(getattr(columns, name)[env] == 0), name
    assert np.all(columns.old_logprobs[~env] < 0)  # the model's tokens are scored
    # The turn reward sits in the token rewards of its turn's last token.
    first = records[0].turn_reward_at[0]
    assert columns.token_rewards[first] == pytest.approx(0.25 - columns.kl[first] * columns.kl_coef, abs=1e-6)
    assert np.isfinite(stats["policy_loss"])


# -- the runner on the real engine ------------------------------------------------------------------


class Echo(Environment):
    """Answers each turn with "ok" for `turns` turns, then ends; slow or failing on request."""

    def __init__(self, turns: int = 2, sleep_s: float = 0.0, fail_at: int | None = None, extra: str | None = None):
        self.turns, self.sleep_s, self.fail_at, self.extra, self.seen = turns, sleep_s, fail_at, extra, 0

    def reset(self, record):
        return self.extra

    def step(self, text: str) -> StepResult:
        self.seen += 1
        time.sleep(self.sleep_s)
        if self.seen == self.fail_at:
            raise ValueError("the tool broke\nsecond line")
        return StepResult(observation="ok", reward=0.1 * self.seen, done=self.seen >= self.turns)


def run_episodes(engine, n=2, prompts=3, environment=Echo, **cfg):
    from rollout.generation.episodes import EpisodeRunner

    tokenizer = engine.llm.get_tokenizer()
    records = [PromptRecord(f"p{i}", [Message("user", f"{i}+1=")], "1", {}, "t") for i in range(prompts)]
    renderer = PromptRenderer(tokenizer, 64)
    ids = [renderer.render(r).prompt_ids for r in records]
    params = {k: cfg.pop(k) for k in ("turns", "sleep_s", "fail_at", "extra", "high") if k in cfg}
    env = EnvConfig(name="echo", params=params, **{"max_turns": 4, "max_episode_tokens": 60, **cfg})
    runner = EpisodeRunner(engine, environment, env, tokenizer)
    try:
        out = list(runner.stream([(records, ids, 7)], SamplingConfig(max_tokens=6, seed=7), n))
    finally:
        runner.close()
    return [c for _, batch in out for samples in batch for c in samples], tokenizer, ids


@pytest.mark.vllm
@pytest.mark.parametrize("processes", [0, 2], ids=["worker_threads", "host_processes"])
def test_an_episode_interleaves_the_models_turns_with_the_environments_tokens(vllm_engine, processes):
    episodes, tokenizer, _ = run_episodes(vllm_engine, turns=2, num_processes=processes)
    assert len(episodes) == 6
    for c in episodes:
        assert c.num_turns == 2 and c.finish_reason in ("stop", "length") and c.env_error is None
        assert len(c.mask) == len(c.token_ids) == len(c.logprobs)
        env = [i for i, m in enumerate(c.mask) if m == 0]
        assert env and env == list(range(env[0], env[-1] + 1))  # one environment turn, between the two
        assert all(c.logprobs[i] == 0.0 for i in env) and all(c.logprobs[i] < 0 for i, m in enumerate(c.mask) if m)
        assert "<|user|>ok" in tokenizer.decode([c.token_ids[i] for i in env])
        # Each turn's reward on its last token: turn 1's before the environment's tokens, turn 2's at the end.
        assert c.turn_reward_at == [env[0] - 1, len(c.token_ids) - 1]
        assert c.turn_rewards == [pytest.approx(0.1), pytest.approx(0.2)]
    assert len({tuple(c.token_ids) for c in episodes}) > 1  # the samples of a prompt differ


@pytest.mark.vllm
def test_an_episode_ends_at_max_turns_and_at_its_token_budget(vllm_engine):
    episodes, _, _ = run_episodes(vllm_engine, turns=10, max_turns=2)
    assert {c.finish_reason for c in episodes} == {"max_turns"} and {c.num_turns for c in episodes} == {2}
    episodes, _, _ = run_episodes(vllm_engine, turns=10, max_turns=10, max_episode_tokens=20)
    assert all(c.finish_reason == "length" and len(c.token_ids) <= 20 for c in episodes)


@pytest.mark.vllm
@pytest.mark.parametrize("processes", [0, 2], ids=["worker_threads", "host_processes"])
def test_an_environment_that_raises_or_runs_late_ends_its_episode_and_the_others_go_on(vllm_engine, processes):
    episodes, _, _ = run_episodes(vllm_engine, turns=3, fail_at=2, num_processes=processes)
    assert {c.finish_reason for c in episodes} == {"env_error"}
    assert {c.env_error for c in episodes} == {"environment echo raised ValueError: the tool broke"}
    episodes, _, _ = run_episodes(
        vllm_engine, n=1, prompts=2, turns=2, sleep_s=1.0, step_timeout_s=0.2, num_processes=processes
    )
    assert {c.finish_reason for c in episodes} == {"env_error"}
    assert all("took more than env.step_timeout_s (0.2s)" in c.env_error for c in episodes)


class Crashing(Echo):
    """Its host process dies in the episode of prompt 1 (a segfault in a simulator, the OOM killer)."""

    def reset(self, record):
        self.prompt = record.prompt_id
        return None

    def step(self, text: str) -> StepResult:
        if self.prompt == "p1":
            import os

            os._exit(3)
        return super().step(text)


@pytest.mark.vllm
def test_a_host_process_that_dies_ends_the_episodes_it_held_and_no_others(vllm_engine):
    """Three hosts, one episode's environment in each (in turn): the crash ends that episode only. With one
    host, every episode whose environment it held ends, each saying why, and the stream still ends."""
    episodes, _, _ = run_episodes(vllm_engine, n=1, prompts=3, environment=Crashing, turns=2, num_processes=3)
    assert [c.finish_reason == "env_error" for c in episodes] == [False, True, False]
    assert episodes[1].env_error == "environment echo raised EnvironmentLost: environment process 1 exited with code 3"
    assert [c.num_turns for c in episodes] == [2, 1, 2]
    episodes, _, _ = run_episodes(vllm_engine, n=1, prompts=3, environment=Crashing, turns=2, num_processes=1)
    assert episodes[1].finish_reason == "env_error"
    reasons = {
        "environment echo raised EnvironmentLost: environment process 0 exited with code 3",  # in flight then
        "environment echo raised EnvironmentLost: its environment was in environment process 0, which exited",
    }
    assert all(c.env_error is None or c.env_error in reasons for c in episodes), [c.env_error for c in episodes]


@pytest.mark.vllm
def test_a_reset_turn_is_rendered_into_the_episodes_own_prompt(vllm_engine):
    episodes, tokenizer, ids = run_episodes(vllm_engine, n=1, prompts=1, turns=1, extra="use the tool")
    [c] = episodes
    assert c.prompt_ids is not None and c.prompt_ids != ids[0]
    assert c.prompt.endswith("<|user|>0+1=\n<|user|>use the tool\n<|assistant|>")
    assert tokenizer.decode(c.prompt_ids) == c.prompt


@pytest.mark.vllm
def test_the_docs_own_environment_loads_by_name_and_plays(vllm_engine, tmp_path, monkeypatch):
    """The number-guessing game docs/environments.md shows, as a user would ship it (a module named in env.name)."""
    from pathlib import Path

    from rollout.environments.registry import check_environment

    page = (Path(__file__).resolve().parents[1] / "docs" / "environments.md").read_text()
    block = page.split("<!-- tests/test_episodes.py loads this environment")[1].split("```python\n")[1].split("```")[0]
    (tmp_path / "team").mkdir()
    (tmp_path / "team" / "__init__.py").write_text("")
    (tmp_path / "team" / "guess.py").write_text(block)
    monkeypatch.syspath_prepend(str(tmp_path))
    guess = check_environment(EnvConfig(name="team.guess:Guess", params={"high": 50}))
    episodes, tokenizer, _ = run_episodes(vllm_engine, environment=guess, high=50, max_turns=3)
    assert len(episodes) == 6 and all(c.env_error is None for c in episodes)
    for c in episodes:  # the random tiny model rarely guesses right: each wrong turn is answered
        assert c.num_turns == 3 or c.finish_reason == "stop" or c.turn_rewards[-1] == 1.0
        environment = tokenizer.decode([t for t, m in zip(c.token_ids, c.mask) if m == 0])
        if c.finish_reason != "length":  # one environment turn between each two of the model's
            assert environment.count("<|user|>") == c.num_turns - 1
        assert all(word in ("higher", "lower", "A number, please.") for word in _observations(environment))
    assert all(c.prompt.endswith("Answer with a number only.\n<|assistant|>") for c in episodes)


def _observations(rendered: str) -> list[str]:
    """The environment's texts in its rendered turns (`<|user|>TEXT\n<|assistant|>`)."""
    return [part.split("\n")[0] for part in rendered.split("<|user|>")[1:]]


def test_environment_processes_that_cannot_import_the_class_fail_before_any_episode():
    from rollout.generation.env_processes import EnvironmentHosts, EnvironmentLost

    ghost = type("Ghost", (Environment,), {"__module__": "no_such_module_here"})  # made here, nowhere to import
    with pytest.raises(
        EnvironmentLost,
        match=r"environment process 0 did not start \(environment process 0 exited "
        r"with code 1.*no_such_module_here.Ghost must be importable in a new Python process",
    ):
        EnvironmentHosts(ghost, EnvConfig(name="ghost", num_processes=2))
