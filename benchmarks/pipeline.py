"""Seconds per iteration of one job with generation in lockstep (max_staleness 0) and one iteration
ahead of the learner (max_staleness 1), under the same settings; prints JSON.

The job is chosen so generation and learning take about as long as each other in lockstep: the
tiny Llama without its SFT warm-up (its random outputs run to max_tokens, so generation is steady)
and enough PPO epochs to match. Generation and learning get one CPU each (one rollout worker,
`rollout.num_cpus_per_worker=1`; one learner rank, `learner.num_cpus_per_rank=1`, one torch thread).
Each setting runs `rollout run` in its own process, alternating, `--repeats` times; the figures are
medians over the iterations after the first two (engine warm-up), of the medians of the runs.
Seconds per iteration are wall-clock (`time/wall`); the stage figures are where the driver waited
(generate, reward) or what the learner reports (values, advantages, update).

    python benchmarks/pipeline.py [--iterations 12 --repeats 2 --prompts 64 --n 4 --max-tokens 64 --ppo-epochs 1]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("generate", "reward", "values", "advantages", "update", "weight_sync", "archive", "wall")


def run(args, staleness: int, out: Path) -> dict[str, float]:
    settings = [
        f"iterations={args.iterations}",
        "checkpoint_every=1000",
        "model.sft_warmup=false",
        f"rollout.prompts_per_iteration={args.prompts}",
        f"rollout.n_samples={args.n}",
        f"rollout.sampling.max_tokens={args.max_tokens}",
        "rollout.max_model_len=128",
        "rollout.num_cpus_per_worker=1",
        "learner.num_cpus_per_rank=1",
        f"learner.ppo_epochs={args.ppo_epochs}",
        f"learner.minibatch_size={args.prompts * args.n // 2}",
        f"rollout.max_staleness={staleness}",
    ]
    command = [
        sys.executable,
        "-m",
        "rollout",
        "run",
        "--config",
        str(ROOT / "configs" / "tiny-arith.yaml"),
        "--out",
        str(out),
    ] + [x for s in settings for x in ("--set", s)]
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"max_staleness={staleness} failed:\n{proc.stderr[-3000:]}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][2:]
    return {stage: statistics.median(r[f"time/{stage}"] for r in rows) for stage in STAGES} | {
        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in rows),
        "version_lag": max(r["version_lag"] for r in rows),
        "reward_mean": statistics.mean(r["reward_mean"] for r in rows),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--ppo-epochs", type=int, default=1)
    args = parser.parse_args()
    results: dict[int, list[dict[str, float]]] = {0: [], 1: []}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            for staleness in (0, 1):
                figures = run(args, staleness, Path(tmp) / f"s{staleness}-{repeat}")
                results[staleness].append(figures)
                print(
                    f"  max_staleness={staleness} run {repeat + 1}: {figures['wall']:.3f} s/iteration",
                    file=sys.stderr,
                    flush=True,
                )
    summary = {s: {k: round(statistics.median(r[k] for r in rs), 4) for k in rs[0]} for s, rs in results.items()}
    print(
        json.dumps(
            {
                "job": {
                    "prompts": args.prompts,
                    "n": args.n,
                    "max_tokens": args.max_tokens,
                    "ppo_epochs": args.ppo_epochs,
                    "iterations": args.iterations,
                    "repeats": args.repeats,
                    "cpus": os.cpu_count(),
                },
                "staleness_0": summary[0],
                "staleness_1": summary[1],
                "seconds_per_iteration": [summary[0]["wall"], summary[1]["wall"]],
                "ratio": round(summary[1]["wall"] / summary[0]["wall"], 3),
            }
        )
    )


if __name__ == "__main__":
    main()
