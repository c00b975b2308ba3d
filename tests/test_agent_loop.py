"""`openai_agent`'s engine loop, which runs on the endpoint's event loop: a stream closed early takes its
requests back from the engine and stops its agents, and the runner serves the next stream; the fast
tokenization of an added turn gives the tokenizer's own ids."""

from __future__ import annotations

import time

import msgspec
import pytest

from contracts.config import EnvConfig, SamplingConfig
from contracts.formats import Message, PromptRecord
from contracts.rendering import PromptRenderer

pytest.importorskip("openai")


def _records(tokenizer, count: int):
    records = [PromptRecord(f"p{i}", [Message("user", f"{i}+1=")], "1", {}, "t") for i in range(count)]
    return records, [PromptRenderer(tokenizer, 64).render(r).prompt_ids for r in records]


@pytest.mark.vllm
def test_a_stream_closed_early_takes_its_calls_back_and_the_next_stream_runs(vllm_engine):
    from rollout.generation.agents import AgentRunner

    tokenizer = vllm_engine.llm.get_tokenizer()
    env = EnvConfig(
        name="openai_agent", params={"agent": "agent_examples:chatty"}, max_turns=1000, max_episode_tokens=1000
    )
    runner = AgentRunner(vllm_engine, env, tokenizer, max_model_len=128)
    try:
        records, ids = _records(tokenizer, 4)
        stream = runner.stream([([], [], 7), (records, ids, 7)], SamplingConfig(max_tokens=2, seed=7), 2)
        assert next(stream) == (0, [])  # the empty batch, at once; the other's agents keep calling
        deadline = time.monotonic() + 60
        while vllm_engine.requests_in_flight == 0 and time.monotonic() < deadline:
            time.sleep(0.001)
        assert vllm_engine.requests_in_flight > 0
        stream.close()
        assert vllm_engine.requests_in_flight == 0
        assert runner.episodes == {}  # every agent stopped

        runner.cfg = msgspec.structs.replace(env, max_turns=2)  # the next stream's agents end at their third call
        out = list(runner.stream([(records[:2], ids[:2], 7)], SamplingConfig(max_tokens=2, seed=7), 1))
        episodes = [c for _, batch in out for group in batch for c in group]
        assert len(episodes) == 2 and all(e.num_turns == 2 and "env.max_turns" in e.env_error for e in episodes)
    finally:
        runner.close()
    assert vllm_engine.requests_in_flight == 0


@pytest.mark.vllm
def test_an_added_turns_ids_are_the_tokenizers_own(vllm_engine):
    from rollout.generation.agent_capture import ChatRendering

    tokenizer = vllm_engine.llm.get_tokenizer()
    rendering = ChatRendering(tokenizer)
    history = [{"role": "user", "content": "3 * 5 = ?"}, {"role": "assistant", "content": "15 ünïcode\n"}]
    messages = [*history, {"role": "user", "content": 'go on <tool_call>{"a": 1}</tool_call>'}]
    for reply_ended in (True, False):
        text = rendering.added(history, messages, None, reply_ended)
        assert text and rendering.ids(text) == tokenizer(text, add_special_tokens=False)["input_ids"]
    whole = rendering.text(messages, None, generation=True)
    assert rendering.ids(whole) == tokenizer(whole, add_special_tokens=False)["input_ids"]
