"""Agents through the worker's OpenAI-compatible endpoint against today's in-process `Environment` path,
in one in-process CPU engine: what does serving an agent over HTTP cost?

The same episodes both ways: `--prompts` (256) episodes of two model calls of up to `--turn-tokens` (32)
tokens, the second after a user turn ("go on"), on the default job's model (the builtin tiny Llama,
random weights) and sampling. The `Environment` path is `EpisodeRunner` with an environment that answers
the first turn and ends at the second; the endpoint path is `AgentRunner` with an agent written with the
`openai` client (`AsyncOpenAI`) making the same two calls, the second extending the first. Prints one JSON
object:

- `tokens_per_s_ratio`: the model's tokens per second through the endpoint over the `Environment` path
  (goal >= 0.8);
- `added_latency_ms_p50` / `_p90`: per call, the agent's time for the call (the openai client's, HTTP
  included) less the call's time in the engine's loop (taken in until its sample was out), over
  `--probe-episodes` (32) episodes run one at a time (goal p50 <= 2 ms); `_in_batch`: the same over the
  throughput run's calls, where a batch's calls finish in one engine step and are answered in turn;
- `client_round_trip_ms_p50`: the same openai client's call to a bare aiohttp server in this process that
  answers at once with a canned completion: the part of the added latency that is the client's and HTTP's,
  which any endpoint adds (on a loaded machine it grows with the load, as the added latency does);
- the figures behind them.

    .venv/bin/python benchmarks/agent_server.py [--prompts 256] [--turn-tokens 32] [--repeats 1] [--probe-episodes 32]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from contracts.builtin_model import build_tiny_llama  # noqa: E402
from contracts.config import EnvConfig, RolloutConfig, SamplingConfig  # noqa: E402
from contracts.environment import Environment, StepResult  # noqa: E402
from contracts.formats import Message, PromptRecord  # noqa: E402
from contracts.rendering import PromptRenderer  # noqa: E402
from rollout.generation.agents import AgentRunner  # noqa: E402
from rollout.generation.engine import VLLMEngine  # noqa: E402
from rollout.generation.episodes import EpisodeRunner  # noqa: E402

CALL_TIMES: dict[str, float] = {}  # the agent's time for each call, by response id


class TwoTurns(Environment):
    def __init__(self):
        self.seen = 0

    def step(self, text: str) -> StepResult:
        self.seen += 1
        return StepResult(done=True) if self.seen >= 2 else StepResult(observation="go on")


async def two_call_agent(client, record, max_tokens: int = 32):
    messages = [{"role": m["role"], "content": m["content"]} for m in record["messages"]]
    for turn in range(2):
        start = time.perf_counter()
        out = await client.chat.completions.create(model="policy", messages=messages, max_tokens=max_tokens)
        CALL_TIMES[out.id] = time.perf_counter() - start
        messages += [
            {"role": "assistant", "content": out.choices[0].message.content},
            {"role": "user", "content": "go on"},
        ]
    return None


def run(runner, records, ids, sampling) -> tuple[float, int]:
    start = time.perf_counter()
    out = list(runner.stream([(records, ids, 7)], sampling, 1))
    seconds = time.perf_counter() - start
    samples = [c for _, batch in out for group in batch for c in group]
    errors = [c.env_error for c in samples if c.env_error]
    if errors:
        raise RuntimeError(f"{len(errors)} episodes failed: {errors[0]}")
    return seconds, sum(sum(c.mask) for c in samples)


def added_ms(call_times: dict[str, float], engine_waits: dict[str, float]) -> list[float]:
    """Per call, the agent's time for it less its time in the engine's loop, in ms, sorted."""
    return sorted(1000 * (call_times[key] - engine_waits[key]) for key in call_times if key in engine_waits)


def percentile(values: list[float], q: float) -> float:
    if len(values) < 2:
        return round(values[0], 3) if values else 0.0
    return round(statistics.quantiles(values, n=100, method="inclusive")[int(100 * q) - 1], 3)


async def bare_round_trips(count: int) -> list[float]:
    """The openai client's calls to a server that does nothing but answer, in ms, sorted."""
    import openai
    from aiohttp import web

    reply = {
        "id": "bare",
        "object": "chat.completion",
        "created": 0,
        "model": "policy",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "12"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 8, "completion_tokens": 2, "total_tokens": 10},
    }

    async def answer(request):
        await request.json()
        return web.json_response(reply)

    app = web.Application()
    app.router.add_post("/v1/chat/completions", answer)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0)
    times = []
    try:
        messages = [{"role": "user", "content": "3*6="}]
        for _ in range(count + 4):  # the first calls open the connection
            start = time.perf_counter()
            out = await client.chat.completions.create(model="policy", messages=messages, max_tokens=32)
            times.append(1000 * (time.perf_counter() - start))
            messages = [*messages[:1], {"role": "assistant", "content": out.choices[0].message.content}]
            messages.append({"role": "user", "content": "go on"})
    finally:
        await client.close()
        await runner.cleanup()
    return sorted(times[4:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=256)
    parser.add_argument("--turn-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--probe-episodes", type=int, default=32, help="run one at a time for the added latency")
    args = parser.parse_args()
    rollout = RolloutConfig(device="cpu")
    engine = VLLMEngine(str(build_tiny_llama()), rollout, seed=0, prefix_caching=True)
    tokenizer = engine.tokenizer
    records = [PromptRecord(f"p{i}", [Message("user", f"{i}*{i + 3}=")], None, {}, "b") for i in range(args.prompts)]
    renderer = PromptRenderer(tokenizer, 64)
    ids = [renderer.render(r).prompt_ids for r in records]
    sampling = SamplingConfig(max_tokens=args.turn_tokens, seed=7)
    env_cfg = EnvConfig(name="two_turns", max_turns=2, max_episode_tokens=4 * args.turn_tokens)
    agent_cfg = EnvConfig(
        name="openai_agent",
        params={"agent": "benchmarks.agent_server:two_call_agent", "max_tokens": args.turn_tokens},
        max_turns=2,
        max_episode_tokens=4 * args.turn_tokens,
    )
    # The agent runs as the module the config names, not as __main__: its timings are read from there.
    from benchmarks.agent_server import CALL_TIMES

    episodes = EpisodeRunner(engine, TwoTurns, env_cfg, tokenizer)
    agents = AgentRunner(engine, agent_cfg, tokenizer, max_model_len=rollout.max_model_len)
    try:
        run(episodes, records[:16], ids[:16], sampling)  # warm-up: the engine's first batches, both paths
        run(agents, records[:16], ids[:16], sampling)
        CALL_TIMES.clear()
        agents.engine_waits.clear()
        env_runs, agent_runs = [], []
        for _ in range(args.repeats):
            env_runs.append(run(episodes, records, ids, sampling))
            agent_runs.append(run(agents, records, ids, sampling))
        loaded = added_ms(CALL_TIMES, agents.engine_waits)
        # One episode at a time: each call's own cost, without waiting behind the batch's other calls.
        CALL_TIMES.clear()
        agents.engine_waits.clear()
        for k in range(args.probe_episodes):
            run(agents, records[k : k + 1], ids[k : k + 1], sampling)
        alone = added_ms(CALL_TIMES, agents.engine_waits)
        bare = asyncio.run(bare_round_trips(2 * args.probe_episodes))
    finally:
        agents.close()
        episodes.close()
    env_rate = max(tokens / seconds for seconds, tokens in env_runs)
    agent_rate = max(tokens / seconds for seconds, tokens in agent_runs)
    print(
        json.dumps(
            {
                "episodes": args.prompts,
                "calls_per_episode": 2,
                "turn_tokens": args.turn_tokens,
                "environment_tokens_per_s": round(env_rate, 1),
                "endpoint_tokens_per_s": round(agent_rate, 1),
                "tokens_per_s_ratio": round(agent_rate / env_rate, 3),
                "environment_seconds": [round(s, 2) for s, _ in env_runs],
                "endpoint_seconds": [round(s, 2) for s, _ in agent_runs],
                "model_tokens": {"environment": env_runs[0][1], "endpoint": agent_runs[0][1]},
                "added_latency_ms_p50": percentile(alone, 0.5),
                "added_latency_ms_p90": percentile(alone, 0.9),
                "calls_measured": len(alone),
                "client_round_trip_ms_p50": percentile(bare, 0.5),
                # The same over the batch's calls, which finish together and are answered one after another.
                "added_latency_ms_p50_in_batch": percentile(loaded, 0.5),
                "added_latency_ms_p90_in_batch": percentile(loaded, 0.9),
            }
        )
    )


if __name__ == "__main__":
    main()
