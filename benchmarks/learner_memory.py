"""Learner memory and speed against batch size, at a fixed token budget per forward pass.

Each point is one PPO iteration (`Learner.learn`: old/reference logprobs and values, advantages,
one epoch of updates) on synthetic samples, in a fresh process, so its peak RSS (`ru_maxrss`) is
that iteration's alone. With `learner.micro_batch_tokens` the peak must stay flat as the batch
grows; `whole_batch_peak_rss_mb` is the same at the smallest and largest batch with a budget large
enough to hold the whole batch in one pass (the design before token budgets), for contrast. Last,
tokens/s of one iteration with 1 and 2 ranks (FSDP2 over gloo, each rank a process with
cores / ranks threads).

    python benchmarks/learner_memory.py [--model builtin:small-llama] [--samples 16 32 64 128]
        [--micro-batch-tokens 1024] [--prompt-tokens 64] [--response-tokens 64]

Prints one JSON object. On a 2-core CPU the default run takes about ten minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def synthetic_batch(samples: int, prompt_tokens: int, response_tokens: int, vocab: int, seed: int = 0):
    """Samples of 3/4 to all of the given lengths, four per prompt, random tokens and scores."""
    import numpy as np
    from learner_workload import random_batch

    rng = np.random.default_rng(seed)
    p = rng.integers(prompt_tokens * 3 // 4, prompt_tokens + 1, samples)
    t = rng.integers(response_tokens * 3 // 4, response_tokens + 1, samples)
    return random_batch(p, t, vocab, rng)


def one_rank(args, rank: int = 0, world_size: int = 1, address: str | None = None, out=None) -> dict:
    import torch

    from contracts.builtin_model import resolve_model_path
    from contracts.config.load import load_config
    from learner.learner import Learner

    torch.manual_seed(0)
    cfg = load_config(
        None,
        [
            "learner.device=cpu",
            f"learner.micro_batch_tokens={args.micro_batch_tokens}",
            "learner.ppo_epochs=1",
            f"learner.minibatch_size={args.samples_one}",
            f"learner.num_ranks={world_size}",
            f"learner.num_cpus_per_rank={max(1, (os.cpu_count() or 1) // world_size)}",
        ],
    )  # the cores, shared out
    path = resolve_model_path(args.model)
    learner = Learner(
        cfg.learner,
        path,
        threads=max(1, (os.cpu_count() or 1) // world_size),
        rank=rank,
        world_size=world_size,
        address=address,
    )
    batch = synthetic_batch(
        args.samples_one, args.prompt_tokens, args.response_tokens, learner.policy.lm.config.vocab_size
    )
    start = time.perf_counter()
    learner.learn(batch)
    seconds = time.perf_counter() - start
    tokens = int(batch.prompt_lengths.sum() + batch.response_lengths.sum())
    result = {
        "params": sum(p.numel() for p in learner.policy.parameters()),  # a DTensor's numel is the whole
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "tokens_per_s": tokens / seconds,
        "seconds": seconds,
    }
    if out is not None:
        out.put(result)
    return result


def _rank_process(args, rank, world_size, address, out):
    one_rank(args, rank, world_size, address, out)


def ranks(args, world_size: int) -> dict:
    """One iteration on `world_size` rank processes; rank 0's figures."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{s.getsockname()[1]}"
    out = ctx.Queue()
    procs = [ctx.Process(target=_rank_process, args=(args, r, world_size, address, out)) for r in range(world_size)]
    for p in procs:
        p.start()
    results = [out.get(timeout=3600) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    return {
        "tokens_per_s": min(r["tokens_per_s"] for r in results),
        "peak_rss_mb_per_rank": max(r["peak_rss_mb"] for r in results),
    }


def measure(args, samples: int, budget: int, world_size: int = 1) -> dict:
    """A fresh interpreter per point: ru_maxrss only ever grows within one."""
    command = [
        sys.executable,
        __file__,
        "--one",
        str(samples),
        "--model",
        args.model,
        "--micro-batch-tokens",
        str(budget),
        "--prompt-tokens",
        str(args.prompt_tokens),
        "--response-tokens",
        str(args.response_tokens),
        "--ranks",
        str(world_size),
    ]
    proc = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if proc.returncode != 0:
        raise SystemExit(f"measuring {samples} samples failed:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"  {samples} samples, budget {budget}, {world_size} rank(s): {result}", file=sys.stderr, flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="builtin:small-llama")
    parser.add_argument("--samples", type=int, nargs="+", default=[16, 32, 64, 128])
    parser.add_argument("--micro-batch-tokens", type=int, default=1024)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--response-tokens", type=int, default=64)
    parser.add_argument("--ranks", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one is not None:
        args.samples_one = args.one
        result = one_rank(args) if args.ranks == 1 else ranks(args, args.ranks)
        print(json.dumps(result))
        return

    from contracts.builtin_model import resolve_model_path

    resolve_model_path(args.model)  # build once, before the measured processes
    points = [measure(args, n, args.micro_batch_tokens) for n in args.samples]
    whole = [measure(args, n, 10**9) for n in (args.samples[0], args.samples[-1])]
    middle = args.samples[len(args.samples) // 2]
    two = measure(args, middle, args.micro_batch_tokens, world_size=2)
    peaks = [p["peak_rss_mb"] for p in points]
    print(
        json.dumps(
            {
                "model": args.model,
                "model_params": points[0]["params"],
                "micro_batch_tokens": args.micro_batch_tokens,
                "tokens_per_sample": args.prompt_tokens + args.response_tokens,
                "samples": args.samples,
                "peak_rss_mb": [round(p, 1) for p in peaks],
                "tokens_per_s": [round(p["tokens_per_s"], 1) for p in points],
                "peak_ratio_largest_to_smallest": round(peaks[-1] / peaks[0], 3),
                "whole_batch_samples": [args.samples[0], args.samples[-1]],
                "whole_batch_peak_rss_mb": [round(w["peak_rss_mb"], 1) for w in whole],
                "ranks_samples": middle,
                "tokens_per_s_1_rank": round(points[len(args.samples) // 2]["tokens_per_s"], 1),
                "tokens_per_s_2_ranks": round(two["tokens_per_s"], 1),
                "peak_rss_mb_per_rank_2_ranks": round(two["peak_rss_mb_per_rank"], 1),
            }
        )
    )


if __name__ == "__main__":
    main()
