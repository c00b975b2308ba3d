"""What resumable requests would give episodes here: vLLM's streaming input (`AsyncLLM.generate` fed an
async generator of `StreamingInput`s) against the rollout worker's way (`benchmarks/multiturn.py`).

The worker runs each later turn of an episode as a new request on the in-process `LLM`, whose prompt is
the episode so far: the prefix cache serves its whole 32-token blocks, and the rest (the observation, and
the earlier turns' last partial block) is computed again, ~1.9x the tokens of single completions at
16-token turns. With streaming input, the scheduler keeps an episode's request and its KV cache between
turns and computes only the observation's tokens. vLLM offers it through `AsyncLLM` only, whose engine
runs in a process of its own (on CPU, bound to one core with the other left to the caller); the
synchronous `LLMEngine` gives every request a fresh id, so it cannot resume one.

The same episodes as `benchmarks/multiturn.py` (`--prompts` x `--n`, `--turns` turns of `--turn-tokens`,
an environment step of `--sleep-ms` on a thread between turns) run through `AsyncLLM` with streaming
input, then the same prompts as single completions through it; then `benchmarks/multiturn.py` runs with
the same arguments in a process of its own. Prints one JSON object:

- `resumable_tokens_per_s_ratio`: episodes over single completions, both through `AsyncLLM`;
- `resumable_tokens_per_s` and `current_tokens_per_s`: the model's tokens per second in episodes, resumed
  in `AsyncLLM` and as the worker runs them; `resumable_over_current`, their ratio (above 1: worth
  moving the worker to);
- `current`: `benchmarks/multiturn.py`'s figures.

    .venv/bin/python benchmarks/multiturn_resumable.py [--prompts 64] [--n 4] [--turns 3]
        [--turn-tokens 16] [--sleep-ms 20] [--repeats 3]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")  # as the worker's engine: no per-request lines
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

sys.path.insert(0, str(ROOT / "benchmarks"))

from multiturn import prompts  # noqa: E402

from contracts.builtin_model import build_tiny_llama  # noqa: E402
from contracts.formats import Message  # noqa: E402
from contracts.rendering import PromptRenderer  # noqa: E402


def sampling(max_tokens: int, seed: int):
    """As the worker samples (the sampled token's logprob, no text), each output a delta: streaming input
    takes no other kind."""
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    return SamplingParams(
        max_tokens=max_tokens, seed=seed, logprobs=0, detokenize=False, output_kind=RequestOutputKind.DELTA
    )


async def episode(engine, prompt_ids, observation_ids, request_id, seed, args, pool) -> int:
    """One episode as one resumable request: a turn, the environment's step on a thread, its observation
    appended, and so on for `args.turns` turns; the model's token count."""
    from vllm.engine.protocol import StreamingInput
    from vllm.inputs import TokensPrompt

    def turn_params(turn: int):
        return sampling(args.turn_tokens, seed + turn)

    turn_over = asyncio.Event()
    loop = asyncio.get_running_loop()

    async def inputs():
        yield StreamingInput(prompt=TokensPrompt(prompt_token_ids=prompt_ids), sampling_params=turn_params(0))
        for turn in range(1, args.turns + 1):
            await turn_over.wait()
            turn_over.clear()
            await loop.run_in_executor(pool, time.sleep, args.sleep_ms / 1000)  # the environment's step
            if turn < args.turns:
                yield StreamingInput(
                    prompt=TokensPrompt(prompt_token_ids=observation_ids), sampling_params=turn_params(turn)
                )

    tokens = 0
    async for output in engine.generate(inputs(), turn_params(0), request_id):
        tokens += len(output.outputs[0].token_ids)
        if output.outputs[0].finish_reason is not None:
            turn_over.set()
    return tokens


async def single(engine, prompt_ids, request_id, seed, args) -> int:
    from vllm.inputs import TokensPrompt

    params = sampling(args.turns * args.turn_tokens, seed)
    tokens = 0
    async for output in engine.generate(TokensPrompt(prompt_token_ids=prompt_ids), params, request_id):
        tokens += len(output.outputs[0].token_ids)
    return tokens


async def resumable(args) -> dict:
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    engine = AsyncLLM.from_engine_args(
        AsyncEngineArgs(
            model=str(build_tiny_llama()),
            dtype="float32",  # as the worker's CPU engine
            max_model_len=512,
            enforce_eager=True,
            enable_chunked_prefill=False,  # as the worker's CPU engine (seeded requests need whole prompts)
            seed=0,
            logprobs_mode="processed_logprobs",
            max_num_seqs=args.prompts * args.n,
        )
    )
    pool = ThreadPoolExecutor(max_workers=256)  # env.num_threads' default: one per sequence of the batch
    try:
        tokenizer = engine.tokenizer
        _, ids = prompts(tokenizer, args.prompts)
        text = PromptRenderer(tokenizer, 64).observation_text(
            [Message("user", "x")], "x", Message("user", "ok"), reply_ended=False
        )
        observation = tokenizer(text, add_special_tokens=False)["input_ids"]
        await asyncio.gather(*(single(engine, ids[i], f"warm{i}", i, args) for i in range(4)))
        rates: dict[str, list[float]] = {"episodes": [], "singles": []}
        for repeat in range(args.repeats):  # alternating, so drift in the machine's speed hits both alike
            for kind in rates:
                start = time.perf_counter()
                calls = [
                    episode(engine, ids[i], observation, f"e{repeat}-{i}-{j}", i * 101 + j, args, pool)
                    if kind == "episodes"
                    else single(engine, ids[i], f"s{repeat}-{i}-{j}", i * 101 + j, args)
                    for i in range(args.prompts)
                    for j in range(args.n)
                ]
                tokens = sum(await asyncio.gather(*calls))
                rates[kind].append(tokens / (time.perf_counter() - start))
        return {kind: statistics.median(r) for kind, r in rates.items()} | {"runs": rates}
    finally:
        pool.shutdown()
        engine.shutdown()
        del engine
        gc.collect()  # its finalizer would shut it down again as the interpreter tears down


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for flag, default in (("--prompts", 64), ("--n", 4), ("--turns", 3), ("--turn-tokens", 16), ("--repeats", 3)):
        parser.add_argument(flag, type=int, default=default)
    parser.add_argument("--sleep-ms", type=float, default=20.0)
    args = parser.parse_args()

    rates = asyncio.run(resumable(args))
    same = [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()]
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "multiturn.py"), *same],
        capture_output=True,
        text=True,
        timeout=1800,
    )
    if proc.returncode != 0:
        raise SystemExit(f"benchmarks/multiturn.py failed:\n{proc.stderr[-3000:]}")
    current = json.loads(proc.stdout)
    current.pop("runs")
    print(
        json.dumps(
            {
                "benchmark": "multiturn_resumable",
                "episodes": args.prompts * args.n,
                "turns": args.turns,
                "turn_tokens": args.turn_tokens,
                "resumable_tokens_per_s_ratio": round(rates["episodes"] / rates["singles"], 3),
                "resumable_tokens_per_s": round(rates["episodes"], 1),
                "resumable_single_tokens_per_s": round(rates["singles"], 1),
                "current_tokens_per_s": current["multi_turn_tokens_per_s"],
                "resumable_over_current": round(rates["episodes"] / current["multi_turn_tokens_per_s"], 3),
                "current": current,
                "runs": rates["runs"],
            },
            indent=1,
        )
    )


if __name__ == "__main__":  # AsyncLLM starts its engine's process by spawning: this module is imported again
    main()
