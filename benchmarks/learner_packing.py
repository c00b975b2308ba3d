"""Packed against padded micro-batches (`learner.pack_sequences`) on this machine, over a grid of batch
sizes, length mixes and thread counts: seconds per PPO iteration of the same samples with packing
forced on, forced off, and left at the project's default, the three learners taking turns (in a
rotating order) so that other load on the machine falls on all alike.

    python benchmarks/learner_packing.py [--model builtin:tiny-llama] [--samples 64 256 1024 2048]
        [--mixes short-uniform ...] [--threads 1 2] [--iterations 3] [--small-tokens 8000]
        [--large-tokens 20000] [--max-tokens 50000]
        [--micro-batch-tokens 8192] [--minibatch-size 64] [--epochs 1]

Mixes as in `learner_workload.py` (default: the grid's, `<short|medium|long>-<uniform|tailed|equal>`).
Each learner (gae with a separate critic, float32 on CPU) runs one warm-up iteration on the point's
first 64 samples, then `--iterations` timed ones; a point of fewer than `--small-tokens` tokens
(under a second an iteration, where a moment's load elsewhere weighs most) runs twice as many, one
of more than `--large-tokens` one fewer, and one of more than `--max-tokens` is skipped (a line saying so), which
keeps the default grid within about 20 minutes on two cores with the tiny model. Prints one JSON object per point: per learner the least wall seconds and
process CPU seconds (all threads; less disturbed by other processes than wall time) of its timed
iterations (on a shared machine the least disturbed), and `default_over_best`, the default's seconds over the faster of packed and padded (wall, and CPU).
No assertions on time.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from learner_workload import GRID_MIXES, sample_batch  # noqa: E402
from transformers import AutoConfig  # noqa: E402

from contracts.builtin_model import resolve_model_path  # noqa: E402
from contracts.config.load import load_config  # noqa: E402
from learner.learner import Learner  # noqa: E402

LAYOUTS = {"packed": ["learner.pack_sequences=true"], "padded": ["learner.pack_sequences=false"], "default": []}


def learner(args, layout: str, threads: int) -> Learner:
    overrides = [
        "learner.device=cpu",
        f"learner.micro_batch_tokens={args.micro_batch_tokens}",
        f"learner.minibatch_size={args.minibatch_size}",
        f"learner.ppo_epochs={args.epochs}",
        "learner.shared_critic=false",
        *LAYOUTS[layout],
    ]
    return Learner(load_config(None, overrides).learner, resolve_model_path(args.model), threads=threads)


def timed(learner: Learner, batch) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    learner.learn(batch)
    return time.perf_counter() - wall, time.process_time() - cpu


def over_best(seconds: dict[str, float]) -> float:
    return seconds["default"] / min(seconds["packed"], seconds["padded"])


def point(args, samples: int, mix: str, threads: int) -> dict:
    vocab = AutoConfig.from_pretrained(resolve_model_path(args.model)).vocab_size
    batch = sample_batch(mix, samples, vocab)
    tokens = int(batch.prompt_lengths.sum() + batch.response_lengths.sum())
    where = {"samples": samples, "mix": mix, "threads": threads, "tokens": tokens}
    if tokens > args.max_tokens:
        return {**where, "skipped": f"more than --max-tokens {args.max_tokens}"}
    learners = {layout: learner(args, layout, threads) for layout in LAYOUTS}
    warm_up = sample_batch(mix, min(samples, 64), vocab, seed=1)
    for one in learners.values():
        one.learn(warm_up)
    iterations = max(1, args.iterations * (1 + (tokens < args.small_tokens)) - (tokens > args.large_tokens))
    runs = {layout: [] for layout in LAYOUTS}
    order = list(LAYOUTS)
    for i in range(iterations):
        for layout in order[i % len(order) :] + order[: i % len(order)]:
            runs[layout].append(timed(learners[layout], batch))
    wall = {layout: min(w for w, _ in rs) for layout, rs in runs.items()}
    cpu = {layout: min(c for _, c in rs) for layout, rs in runs.items()}
    return {
        **where,
        "longest": int((batch.prompt_lengths + batch.response_lengths).max()),
        "iterations": iterations,
        "wall_seconds": {k: round(v, 4) for k, v in wall.items()},
        "cpu_seconds": {k: round(v, 4) for k, v in cpu.items()},
        "packed_over_padded": round(wall["packed"] / wall["padded"], 3),
        "default_over_best": round(over_best(wall), 3),
        "default_over_best_cpu": round(over_best(cpu), 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="builtin:tiny-llama")
    parser.add_argument("--samples", type=int, nargs="+", default=[64, 256, 1024, 2048])
    parser.add_argument("--mixes", nargs="+", default=list(GRID_MIXES))
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--iterations", type=int, default=3)
    parser.add_argument("--small-tokens", type=int, default=8_000)
    parser.add_argument("--large-tokens", type=int, default=20_000)
    parser.add_argument("--max-tokens", type=int, default=50_000)
    parser.add_argument("--micro-batch-tokens", type=int, default=8192)
    parser.add_argument("--minibatch-size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=1)
    args = parser.parse_args()
    common = {
        "model": args.model,
        "micro_batch_tokens": args.micro_batch_tokens,
        "minibatch_size": args.minibatch_size,
        "epochs": args.epochs,
    }
    for threads, mix, samples in itertools.product(args.threads, args.mixes, args.samples):
        print(json.dumps({**common, **point(args, samples, mix, threads)}), flush=True)


if __name__ == "__main__":
    main()
