"""Multi-turn episodes against single completions, in one in-process CPU engine: does an environment that
takes its time stall the engine?

Every episode has `--turns` model turns of up to `--turn-tokens` tokens, with an environment between
them that sleeps `--sleep-ms` (20) per step, as a tool call or a remote grader would; the same prompts
are then generated as single completions of `--turns` x `--turn-tokens` tokens, so both make about the
same number of model tokens. The tiny model is the builtin with random weights, which rarely ends a turn
early. With the default 64 x 4 episodes, one engine batch, the episodes move in lockstep: each turn
ends for all of them at once, and the engine waits out one environment step per turn; `--prompts 256`
(more episodes than the engine holds, as a rollout worker streaming thousands has) measures the steady
state, where other episodes' turns fill those waits. `--busy` makes the environment compute in Python for
its `--sleep-ms` instead (a grader's parsing, a simulator), which holds the interpreter lock; `--processes N` runs the environments in N processes of
their own (`env.num_processes`). Prints one JSON object:

- `engine_busy_fraction`: the engine's step time over the episodes' generation wall time (goal >= 0.9:
  while episodes wait on their environment, the engine steps the others);
- `engine_intake_fraction`: of that wall time, vLLM taking in the turns' requests (`VLLMEngine.submit`, ~0.1 ms
  a request here: each later turn is a new request), and `engine_idle_fraction`: waiting with every
  episode at its environment; what is left is the loop's own bookkeeping;
- `tokens_per_s_ratio`: the model's tokens per second in episodes over single completions (goal >= 0.8);
- the figures behind both, the mean environment step, and `prefix_cached_fraction`: of the later turns'
  prompts (the episode so far), the tokens the prefix cache served rather than computed again.

    .venv/bin/python benchmarks/multiturn.py [--prompts 64] [--n 4] [--turns 3] [--turn-tokens 16]
        [--sleep-ms 20] [--busy] [--processes 0]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from contracts.builtin_model import build_tiny_llama  # noqa: E402
from contracts.config import EnvConfig, RolloutConfig, SamplingConfig  # noqa: E402
from contracts.environment import Environment, StepResult  # noqa: E402
from contracts.formats import Message, PromptRecord
from contracts.rendering import PromptRenderer  # noqa: E402
from rollout.generation.completions import generate_completions  # noqa: E402
from rollout.generation.engine import VLLMEngine  # noqa: E402
from rollout.generation.episodes import EpisodeRunner  # noqa: E402


class Sleepy(Environment):
    """Answers every turn after `delay_s`, waiting as a slow tool does or (`busy`) computing in Python; the
    episode ends after `turns` model turns."""

    def __init__(self, delay_s: float = 0.02, turns: int = 3, busy: bool = False):
        self.delay_s, self.turns, self.busy, self.seen = delay_s, turns, busy, 0

    def step(self, text: str) -> StepResult:
        if self.busy:
            end = time.perf_counter() + self.delay_s
            while time.perf_counter() < end:
                pass
        else:
            time.sleep(self.delay_s)
        self.seen += 1
        return StepResult(observation="ok", done=self.seen >= self.turns)


def prompts(tokenizer, count: int) -> tuple[list[PromptRecord], list[list[int]]]:
    """`count` short sums as prompt records, and their rendered token ids."""
    records = [PromptRecord(f"p{i}", [Message("user", f"{i}+{i}=")], None, {}, "bench") for i in range(count)]
    renderer = PromptRenderer(tokenizer, 64)
    return records, [renderer.render(r).prompt_ids for r in records]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--turns", type=int, default=3)
    parser.add_argument("--turn-tokens", type=int, default=16)
    parser.add_argument("--sleep-ms", type=float, default=20.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="env.num_threads (default: the config's)")
    parser.add_argument("--busy", action="store_true", help="the environment computes instead of waiting")
    parser.add_argument("--processes", type=int, default=0, help="env.num_processes")
    args = parser.parse_args()

    model = str(build_tiny_llama())
    rollout = RolloutConfig(device="cpu", max_model_len=512, n_samples=args.n)
    engine = VLLMEngine(model, rollout, seed=0, prefix_caching=True)
    tokenizer = engine.tokenizer
    records, ids = prompts(tokenizer, args.prompts)
    env = EnvConfig(
        name="sleepy",
        params={"delay_s": args.sleep_ms / 1000, "turns": args.turns, "busy": args.busy},
        num_processes=args.processes,
        max_turns=args.turns,
        max_episode_tokens=args.turns * (args.turn_tokens + 8),
        **({"num_threads": args.threads} if args.threads else {}),
    )
    runner = EpisodeRunner(engine, Sleepy, env, tokenizer)
    turn = SamplingConfig(max_tokens=args.turn_tokens, seed=0)
    whole = SamplingConfig(max_tokens=args.turns * args.turn_tokens, seed=0)
    generate_completions(engine, ids[:4], turn, 1)  # warm-up: the first calls set up kernels

    episodes, singles = [], []
    for _ in range(args.repeats):  # alternating, so drift in the machine's speed hits both alike
        runner.env_seconds, runner.resumed_tokens, runner.cached_tokens, runner.idle_seconds = [], 0, 0, 0.0
        engine.step_seconds = engine.intake_seconds = 0.0
        engine.llm.reset_prefix_cache()  # a repeat's episodes are the same: the last run's cache would serve them
        start = time.perf_counter()
        outputs = [c for _, batch in runner.stream([(records, ids, 0)], turn, args.n) for cs in batch for c in cs]
        wall = time.perf_counter() - start
        tokens = sum(sum(c.mask) for c in outputs)
        steps = runner.env_seconds
        episodes.append(
            {
                "wall_s": wall,
                "engine_s": engine.step_seconds,
                "intake_s": engine.intake_seconds,
                "idle_s": runner.idle_seconds,
                "model_tokens": tokens,
                "env_step_s": sum(steps) / len(steps),
                "prefix_cached_fraction": runner.cached_tokens / max(1, runner.resumed_tokens),
            }
        )
        start = time.perf_counter()
        plain = generate_completions(engine, ids, whole, args.n)
        wall = time.perf_counter() - start
        singles.append({"wall_s": wall, "model_tokens": sum(len(c.token_ids) for cs in plain for c in cs)})

    runner.close()

    def median(rows, key, per_second=False):
        return statistics.median(r[key] / r["wall_s"] if per_second else r[key] for r in rows)

    busy = median(episodes, "engine_s", per_second=True)
    multi_tps = median(episodes, "model_tokens", per_second=True)
    single_tps = median(singles, "model_tokens", per_second=True)
    print(
        json.dumps(
            {
                "benchmark": "multiturn",
                "episodes": args.prompts * args.n,
                "turns": args.turns,
                "turn_tokens": args.turn_tokens,
                "env_sleep_ms": args.sleep_ms,
                "env_busy": args.busy,
                "env_processes": args.processes,
                "engine_busy_fraction": round(busy, 3),
                "engine_intake_fraction": round(median(episodes, "intake_s", per_second=True), 3),
                "engine_idle_fraction": round(median(episodes, "idle_s", per_second=True), 3),
                "tokens_per_s_ratio": round(multi_tps / single_tps, 3),
                "multi_turn_tokens_per_s": round(multi_tps, 1),
                "single_turn_tokens_per_s": round(single_tps, 1),
                "env_step_mean_s": round(median(episodes, "env_step_s"), 4),
                "prefix_cached_fraction": round(median(episodes, "prefix_cached_fraction"), 3),
                "runs": {"episodes": episodes, "singles": singles},
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
