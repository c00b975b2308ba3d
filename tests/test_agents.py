"""`openai_agent`: agents written against the OpenAI API run against the worker's endpoint, on the real
in-process engine, with the real `openai` client; every call captured token by token."""

from __future__ import annotations

import datetime
import json
import math

import pytest

from contracts.config import EnvConfig, SamplingConfig
from contracts.formats import Message, PromptRecord
from contracts.rendering import PromptRenderer, PromptTask

NOW = datetime.datetime(2026, 1, 1, tzinfo=datetime.timezone.utc)

pytest.importorskip("openai")


def run_agents(engine, agent: str, n=2, prompts=2, **cfg):
    from rollout.generation.agents import AgentRunner

    tokenizer = engine.llm.get_tokenizer()
    records = [PromptRecord(f"p{i}", [Message("user", f"{i}+1=")], "1", {"k": i}, "t") for i in range(prompts)]
    ids = [PromptRenderer(tokenizer, 64).render(r).prompt_ids for r in records]
    params = {"agent": f"agent_examples:{agent}", **cfg.pop("params", {})}
    env = EnvConfig(name="openai_agent", params=params, **{"max_turns": 4, "max_episode_tokens": 60, **cfg})
    runner = AgentRunner(engine, env, tokenizer, max_model_len=128)
    try:
        out = list(runner.stream([(records, ids, 7)], SamplingConfig(max_tokens=6, seed=7), n))
    finally:
        runner.close()
    return [c for _, batch in out for samples in batch for c in samples], tokenizer, runner


def agent_run_rows(engine, agent: str, reward_to: str, tmp_path):
    """`agent`'s episodes (2 prompts, 1 sample each) through generation, the reward workers' scoring (a
    length rule, 0.01 per character, and the agent's component) and the archive, read back as records."""
    from contracts.config import RewardConfig, RuleSpec
    from contracts.schema import from_record_batch
    from reward.worker import RewardWorker
    from rollout.archive.columns import archive_batches, generation_batch
    from rollout.archive.reader import read_table
    from rollout.archive.writer import ArchiveWriter

    episodes, _, _ = run_agents(engine, agent, n=1, params={"fresh": True, "reward_to": reward_to})
    records = [PromptRecord(f"p{i}", [Message("user", f"{i}+1=")], "1", {"k": i}, "t") for i in range(2)]
    tasks = [PromptTask(r.prompt_id, r.messages[-1].content, [1, 2]) for r in records]
    gen = generation_batch(
        tasks, [[e] for e in episodes], run_id="r", iteration=0, policy_version=0, worker="w", generated_at=NOW
    )
    rule = RuleSpec(name="length", weight=2.0, params={"target": 0})
    worker = RewardWorker(RewardConfig(rules=[rule], agent_weight=0.5))
    rewards, _ = worker.score_batch(gen, records)
    writer = ArchiveWriter(tmp_path, {}, worker.components)
    for batch in archive_batches([gen], [rewards], None, worker.components):
        writer.write_batch(batch)
    writer.close()
    return from_record_batch(read_table(tmp_path).to_batches()[0]), worker.components


@pytest.mark.vllm
def test_an_extending_call_is_stitched_onto_the_row_with_the_sampled_tokens_verbatim(vllm_engine):
    import agent_examples

    agent_examples.SEEN.clear()
    episodes, tokenizer, _ = run_agents(vllm_engine, "two_calls")
    assert len(episodes) == 4
    for episode in episodes:
        assert episode.env_error is None and episode.num_turns == 2
        # The agent's reward is its own component (the reward workers'), not a turn reward of the row.
        assert episode.agent_reward == 0.5 and episode.turn_rewards == []
        assert episode.segment == 0 and episode.earlier_segments == [] and episode.episode_id.startswith("rollout-")
        assert len(episode.mask) == len(episode.token_ids) == len(episode.logprobs)
        # model | context (the agent's added message) | model
        runs = [episode.mask[0]]
        for a, b in zip(episode.mask, episode.mask[1:]):
            if a != b:
                runs.append(b)
        assert runs == [1, 0, 1]
        assert all(lp == 0.0 for lp, m in zip(episode.logprobs, episode.mask) if m == 0)
        assert all(lp <= 0.0 for lp in episode.logprobs)
        context = tokenizer.decode([t for t, m in zip(episode.token_ids, episode.mask) if m == 0])
        assert "<|user|>and then?" in context and context.endswith("<|assistant|>")
    for (first, second), episode in zip(agent_examples.SEEN["two_calls"], episodes):
        assert first.choices[0].finish_reason in ("stop", "length")
        # The second call's prompt is the first's, its sampled tokens and the context: the row is exactly
        # what the engine saw, prompt and all.
        assert len(episode.prompt_ids) == first.usage.prompt_tokens
        assert second.usage.prompt_tokens + second.usage.completion_tokens == len(episode.prompt_ids) + len(
            episode.token_ids
        )
        assert episode.mask[: first.usage.completion_tokens] == [1] * first.usage.completion_tokens


@pytest.mark.vllm
def test_a_plain_function_runs_on_a_thread_with_a_blocking_client(vllm_engine):
    episodes, _, _ = run_agents(vllm_engine, "plain", n=1)
    assert [e.env_error for e in episodes] == [None, None]
    assert all(e.agent_reward == 1.0 and e.num_turns == 1 and all(e.mask) for e in episodes)


@pytest.mark.vllm
def test_an_agent_asking_for_base_url_gets_openai_shaped_answers_and_errors(vllm_engine):
    import agent_examples

    agent_examples.SEEN.clear()
    episodes, _, _ = run_agents(vllm_engine, "by_url", n=1, prompts=1)
    assert episodes[0].env_error is None and episodes[0].num_turns == 1
    models, bad_status, bad, ok_status, unknown_status = agent_examples.SEEN["by_url"][0]
    assert models["object"] == "list" and models["data"][0]["object"] == "model"
    assert bad_status == 400 and "n must be 1" in bad["error"]["message"]
    assert ok_status == 200 and unknown_status == 404


@pytest.mark.vllm
@pytest.mark.parametrize(
    "agent, params, expected",
    [
        ("raises", {}, "agent agent_examples:raises raised ValueError: the agent broke"),
        ("sleeps", {"episode_timeout_s": 0.5}, "took more than env.params.episode_timeout_s (0.5s)"),
        ("chatty", {}, "made more than env.max_turns (4) calls"),
    ],
)
def test_an_agents_fault_ends_its_episode_with_env_error(vllm_engine, agent, params, expected):
    episodes, _, runner = run_agents(vllm_engine, agent, n=1, params=params)
    assert all(e.finish_reason == "env_error" and expected in e.env_error for e in episodes), episodes[0].env_error
    assert runner.env_errors == 2


@pytest.mark.vllm
def test_a_fresh_context_call_starts_a_second_segment_of_the_episode(vllm_engine):
    import agent_examples

    agent_examples.SEEN.clear()
    episodes, tokenizer, runner = run_agents(vllm_engine, "two_calls", n=1, params={"fresh": True})
    assert runner.env_errors == 0 and len({e.episode_id for e in episodes}) == 2
    for last, (first_call, second_call) in zip(episodes, agent_examples.SEEN["two_calls"]):
        (first,) = last.earlier_segments
        assert (first.segment, last.segment) == (0, 1) and first.episode_id == last.episode_id
        assert first.env_error is None and last.finish_reason in ("stop", "length")
        # Each segment is its own call's prompt and sampled tokens: nothing of the other one's context.
        assert len(first.prompt_ids) == first_call.usage.prompt_tokens
        assert len(first.token_ids) == first_call.usage.completion_tokens
        assert len(last.prompt_ids) == second_call.usage.prompt_tokens
        assert len(last.token_ids) == second_call.usage.completion_tokens
        assert tokenizer.decode(last.prompt_ids).endswith("<|user|>again\n<|assistant|>")
        assert all(first.mask) and all(last.mask) and first.num_turns == last.num_turns == 1
        assert first.agent_reward == last.agent_reward == 0.5


@pytest.mark.vllm
@pytest.mark.parametrize("reward_to", ["all_segments", "last_segment"])
def test_the_episodes_reward_lands_on_its_segments_and_component_agent_is_archived(vllm_engine, tmp_path, reward_to):
    rows, components = agent_run_rows(vllm_engine, "two_calls", reward_to, tmp_path)
    assert components == ("length", "agent")
    assert [(r.prompt_id, r.sample_index, r.segment) for r in rows] == [
        ("p0", 0, 0),
        ("p0", 0, 1),
        ("p1", 0, 0),
        ("p1", 0, 1),
    ]
    for first, last in (rows[:2], rows[2:]):
        assert first.episode_id == last.episode_id is not None
        # The rules score the episode's last answer; the agent's 0.5 is component `agent`, weighted 0.5.
        length = last.reward_components["length"]
        assert length == pytest.approx(-min(1.0, 0.01 * len(last.final_turn)))
        assert last.reward_components["agent"] == 0.5
        assert last.reward == pytest.approx(2.0 * length + 0.5 * 0.5)
        if reward_to == "all_segments":
            assert first.reward == last.reward and first.reward_components == last.reward_components
        else:
            assert first.reward == 0.0 and first.reward_components == {}


def test_reward_to_and_the_agent_component_are_checked_and_set_at_load():
    from contracts.config import ConfigError
    from contracts.config.load import check, load_config
    from rollout.environments.registry import check_environment

    env = {"name": "openai_agent", "params": {"agent": "agent_examples:two_calls", "reward_to": "every_segment"}}
    cfg = load_config({"env": env})
    with pytest.raises(ConfigError, match="env.params.reward_to must be one of all_segments, last_segment"):
        check_environment(cfg.env)
    assert cfg.reward.agent_weight == 1.0  # the agent's reward counts, unless the config says otherwise
    assert load_config({"env": env, "reward": {"agent_weight": 0.3}}).reward.agent_weight == 0.3
    assert load_config({}).reward.agent_weight is None
    with pytest.raises(ConfigError, match="rollout.dynamic_sampling with env.name openai_agent"):
        check(load_config({"env": env, "rollout": {"dynamic_sampling": {"enabled": True}}}), cuda_available=False)


def test_the_hermes_parser_reads_tool_calls_back_as_json_only():
    from rollout.environments.tool_calls import TOOL_PARSERS

    parse = TOOL_PARSERS["hermes"]
    content, calls = parse('ok <tool_call>{"name": "calc", "arguments": {"x": "2*3"}}</tool_call>')
    assert content == "ok" and calls[0]["function"] == {"name": "calc", "arguments": json.dumps({"x": "2*3"})}
    assert parse("<tool_call>__import__('os')</tool_call>") == ("<tool_call>__import__('os')</tool_call>", [])


def test_the_builtin_template_renders_tools_tool_calls_and_results(tiny_model_path):
    from transformers import AutoTokenizer

    from rollout.environments.calculator_agent import CALC_TOOL

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path)
    call = {"id": "c", "type": "function", "function": {"name": "calc", "arguments": '{"x": "2*3"}'}}
    messages = [
        {"role": "user", "content": "2*3="},
        {"role": "assistant", "content": "", "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "c", "content": "6"},
    ]
    text = tokenizer.apply_chat_template(messages, tools=[CALC_TOOL], tokenize=False, add_generation_prompt=True)
    assert text == (
        '<s><|system|>tools: calc(x)\n<|user|>2*3=\n<|assistant|><tool_call>{"name": "calc", "arguments": '
        '{"x": "2*3"}}</tool_call></s>\n<|user|><tool_response>6</tool_response>\n<|assistant|>'
    )
    plain = tokenizer.apply_chat_template(
        [{"role": "user", "content": "a"}], tokenize=False, add_generation_prompt=True
    )
    assert plain == "<s><|user|>a\n<|assistant|>"  # messages without tools render as before
    # The Hermes markers and JSON scaffolding are a token each: a call is near tiny-calc's `<calc>` in length,
    # and decodes to the text the `hermes` parser reads.
    written = '<tool_call>{"name": "calc", "arguments": {"x": "123*456"}}</tool_call>'
    ids = tokenizer(written, add_special_tokens=False)["input_ids"]
    assert len(ids) == 18 and tokenizer.decode(ids) == written


@pytest.mark.vllm
def test_an_agent_written_with_the_openai_agents_sdk_trains_unchanged(vllm_engine):
    pytest.importorskip("agents")
    import agent_examples

    agent_examples.SEEN.clear()
    agent_examples.PARSED[0] = 0
    parser = {"tool_parser": "agent_examples:every_other_call_is_calc"}
    (episode,), tokenizer, _ = run_agents(vllm_engine, "agents_sdk", n=1, prompts=1, params=parser)
    assert episode.env_error is None, episode.env_error
    prompt = tokenizer.decode(episode.prompt_ids)
    assert prompt.startswith("<s><|system|>tools: calc(x)\n<|system|>Use calc for arithmetic.\n<|user|>")
    # The SDK ran the tool and sent its result back with the conversation: one row, two calls.
    assert episode.num_turns == 2 and episode.final_text == agent_examples.SEEN["agents_sdk"][0]
    context = tokenizer.decode([t for t, m in zip(episode.token_ids, episode.mask) if m == 0])
    assert "<|user|><tool_response>6</tool_response>" in context


def test_calc_tools_demonstrations_are_what_the_calculator_agent_will_see(tiny_model_path):
    """`builtin:calc-tools` (tiny-agent's SFT warm-up): its prompt is the one the agent's first call
    renders (the tool list as the template writes it), and its demonstrated call is what `hermes` reads."""
    from transformers import AutoTokenizer

    from learner.sft import demonstration_example
    from rollout.driver.prompts import calc_records
    from rollout.environments.calculator_agent import CALC_TOOL, tool_result
    from rollout.environments.tool_calls import TOOL_PARSERS

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path)
    renderer = PromptRenderer(tokenizer, 64)
    for record in calc_records(5, 999, 0, tools=True):
        question = [{"role": "user", "content": record.messages[-1].content}]
        agent_prompt = tokenizer.apply_chat_template(
            question, tools=[CALC_TOOL], tokenize=False, add_generation_prompt=True
        )
        assert renderer.text(record) == agent_prompt
        call = record.metadata["demonstration"][0]["content"]
        _, (parsed,) = TOOL_PARSERS["hermes"](call)
        assert tool_result(parsed["function"]["arguments"]) == record.reference
        _, ids, mask = demonstration_example(record, renderer)
        assert "<|user|><tool_response>" in tokenizer.decode([t for t, m in zip(ids, mask) if m == 0])


def test_an_agent_that_returns_no_reward_is_no_failed_component():
    """An agent's None leaves component `agent` null: the iteration's metrics count it apart from a failed
    (NaN) score."""
    from contracts.schema import reward_batch
    from reward.scorer import RewardResult
    from rollout.driver.metrics import iteration_metrics
    from rollout.generation.worker import GenerationSummary

    results = [
        RewardResult(total=1.5, components={"arithmetic": 1.0, "agent": 0.5}, failed=[]),
        RewardResult(total=0.0, components={"arithmetic": 0.0}, failed=[]),
        RewardResult(total=0.0, components={"arithmetic": 0.0, "agent": math.nan}, failed=["agent"]),
    ]
    rewards = reward_batch(results, ("arithmetic", "agent"))
    summary = GenerationSummary("rollout-0", 1.0, 3, 30, 3, 0, turns=6)
    metrics = iteration_metrics(0, [summary], [rewards], {}, {}, 1)
    assert metrics["reward/agent"] == 0.5 and metrics["reward_failed/agent"] == 1
    assert metrics["reward_failed/arithmetic"] == 0
