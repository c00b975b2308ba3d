"""Packed against padded micro-batches (`learner.pack_sequences`) on this machine: seconds per PPO
iteration of the same samples, the two learners alternating so that other load on the machine falls
on both alike.

    python benchmarks/learner_packing.py [--model builtin:tiny-llama] [--samples 128] [--mix realistic]
        [--iterations 5] [--threads 1] [--micro-batch-tokens 4096]

Each learner (gae with a separate critic, one epoch, float32 on CPU) runs one warm-up iteration, then
`--iterations` timed ones, alternating; per stage the median wall seconds and process CPU seconds
(all threads; less disturbed by other processes than wall time) of each, and packed over padded.
Mixes as in `learner_workload.py`. Prints one JSON object. No assertions on time.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from learner_workload import sample_batch  # noqa: E402

from contracts.builtin_model import resolve_model_path  # noqa: E402
from contracts.config.load import load_config  # noqa: E402
from learner.learner import Learner  # noqa: E402


def learner(args, packed: bool) -> Learner:
    overrides = [
        "learner.device=cpu",
        f"learner.micro_batch_tokens={args.micro_batch_tokens}",
        f"learner.minibatch_size={args.minibatch_size}",
        f"learner.pack_sequences={str(packed).lower()}",
        "learner.ppo_epochs=1",
        "learner.shared_critic=false",
    ]
    return Learner(load_config(None, overrides).learner, resolve_model_path(args.model), threads=args.threads)


def timed(learner: Learner, batch) -> dict[str, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    _, _, stages = learner.learn(batch)
    return {**stages, "iteration": time.perf_counter() - wall, "iteration_cpu": time.process_time() - cpu}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="builtin:tiny-llama")
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--mix", choices=("uniform", "realistic"), default="realistic")
    parser.add_argument("--iterations", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--micro-batch-tokens", type=int, default=4096)
    parser.add_argument("--minibatch-size", type=int, default=64)
    args = parser.parse_args()
    learners = {packed: learner(args, packed) for packed in (True, False)}
    vocab = learners[True].policy.lm.config.vocab_size
    batch = sample_batch(args.mix, args.samples, vocab)
    for one in learners.values():
        one.learn(sample_batch(args.mix, 16, vocab, seed=1))  # warm-up
    runs = {True: [], False: []}
    for i in range(args.iterations):
        for packed, one in learners.items():
            runs[packed].append(timed(one, batch))
            print(f"iteration {i} packed={packed}: {runs[packed][-1]}", file=sys.stderr, flush=True)
    median = {
        "packed" if packed else "padded": {k: statistics.median(r[k] for r in rs) for k in rs[0]}
        for packed, rs in runs.items()
    }
    tokens = int(batch.prompt_lengths.sum() + batch.response_lengths.sum())
    padded_tokens = sum(
        len(m.rows) * (batch.prompt_lengths[m.rows].max() + max(1, batch.response_lengths[m.rows].max()))
        for m in learners[False].plan(batch, np.arange(len(batch)))[0]
    )
    out = {
        "model": args.model,
        "mix": args.mix,
        "samples": args.samples,
        "threads": args.threads,
        "micro_batch_tokens": args.micro_batch_tokens,
        "tokens": tokens,
        "padded_tokens_in_the_no_grad_passes": int(padded_tokens),
        "median_seconds": median,
        "packed_over_padded": {k: median["packed"][k] / median["padded"][k] for k in median["packed"]},
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
