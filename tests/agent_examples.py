"""Agents the endpoint tests run (`env.params.agent: agent_examples:NAME`; tests/ is on the path)."""

from __future__ import annotations

import asyncio
import time

SEEN: dict[str, list] = {}  # what the agents saw, by test key
PARSED = [0]


def every_other_call_is_calc(text: str):
    """A tool-call parser (env.params.tool_parser) that reads the random model's first reply of an episode
    as `calc(2*3)` and its second as the answer: the SDK's tool round trip without a trained model."""
    PARSED[0] += 1
    if PARSED[0] % 2:
        return None, [{"id": "c", "type": "function", "function": {"name": "calc", "arguments": '{"x": "2*3"}'}}]
    return text, []


async def two_calls(client, record, key: str = "two_calls", fresh: bool = False):
    """Two calls, the second extending the first (or, `fresh`, starting over), with the real openai client."""
    messages = [{"role": "user", "content": record["messages"][-1]["content"]}]
    first = await client.chat.completions.create(model="anything", messages=messages, max_tokens=8)
    reply = first.choices[0].message
    if fresh:
        messages = [{"role": "user", "content": "again"}]
    else:
        messages += [reply.model_dump(exclude_none=True), {"role": "user", "content": "and then?"}]
    second = await client.chat.completions.create(model="anything", messages=messages, max_tokens=8)
    SEEN.setdefault(key, []).append((first, second))
    return 0.5


def plain(client, record):
    """A plain function: its client is a blocking openai.OpenAI, run on a thread."""
    out = client.completions.create(model="x", prompt="1+1=", max_tokens=4)
    return 1.0 if out.choices[0].text is not None else 0.0


async def raises(client, record):
    await client.chat.completions.create(model="x", messages=[{"role": "user", "content": "hi"}], max_tokens=4)
    raise ValueError("the agent broke\nsecond line")


async def sleeps(client, record):
    await asyncio.sleep(30)


async def chatty(client, record):
    messages = [{"role": "user", "content": "hi"}]
    while True:
        out = await client.chat.completions.create(model="x", messages=messages, max_tokens=2)
        messages += [out.choices[0].message.model_dump(exclude_none=True), {"role": "user", "content": "more"}]


def blocking_sleeps(client, record):
    time.sleep(5)


async def by_url(base_url, record):
    import httpx

    async with httpx.AsyncClient() as http:
        models = (await http.get(f"{base_url}/models")).json()
        bad = await http.post(
            f"{base_url}/chat/completions", json={"messages": [{"role": "user", "content": "x"}], "n": 2}
        )
        ok = await http.post(
            f"{base_url}/chat/completions", json={"messages": [{"role": "user", "content": "x"}], "max_tokens": 2}
        )
        unknown = await http.post(base_url.rsplit("/episodes/", 1)[0] + "/episodes/nope/v1/chat/completions", json={})
    SEEN.setdefault("by_url", []).append((models, bad.status_code, bad.json(), ok.status_code, unknown.status_code))
    return None


async def agents_sdk(client, record):
    """An agent written with the OpenAI Agents SDK: its chat-completions model class on the episode's
    client, a function tool, tracing off (nothing leaves the machine)."""
    from agents import Agent, ModelSettings, OpenAIChatCompletionsModel, Runner, function_tool, set_tracing_disabled

    set_tracing_disabled(True)

    @function_tool
    def calc(x: str) -> str:
        """The value of an arithmetic expression."""
        from rollout.environments.calculator import calculate

        return calculate(x)[0]

    agent = Agent(
        name="calculator",
        instructions="Use calc for arithmetic.",
        tools=[calc],
        model=OpenAIChatCompletionsModel(model="policy", openai_client=client),
        model_settings=ModelSettings(max_tokens=6, temperature=1.0),
    )
    result = await Runner.run(agent, record["messages"][-1]["content"], max_turns=3)
    SEEN.setdefault("agents_sdk", []).append(result.final_output)
    return None
