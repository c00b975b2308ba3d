"""What partial rollouts gain on a long-tailed workload: the default job (`configs/tiny-arith.yaml`) on data
whose SFT warm-up teaches the model a tail. Nine prompts in ten are `a+b=` problems answered in a token or
two; one in ten asks to "think long" and its demonstration runs past `--max-tokens` (128), so the warmed-up
model answers it with max_tokens. Rewards are the answers' similarity to the reference. The same job runs
without and with `rollout.partial_rollouts`, both at rollout.max_staleness 1.

Per run, from its metrics lines but the first (which holds the start-up): trained samples per second of
wall time (`samples` less `partial/dropped_stale`, over `time/wall`), the engine's idle fraction (1 - the
engine's step fill: the tokens its steps sampled over steps x the sequences a step holds), the answers'
length profile, and with partial rollouts the version spread and the resumed, carried and dropped counts.
Prints one JSON object: `speedup` (samples/s with / without; the issue's goal is 1.3) and each run's figures.

    .venv/bin/python benchmarks/partial_rollouts.py [--iterations 8] [--max-tokens 128] [--sft-steps 60] [--set K=V ...]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from job_watch import ROOT, metrics, watch_run  # noqa: E402

LONG_EVERY = 10  # one prompt in this many asks for a long answer


def long_tail_data(path: Path, records: int, max_tokens: int) -> None:
    """`records` prompts, one in LONG_EVERY of them with a demonstration longer than max_tokens."""
    rng = np.random.default_rng(0)
    with path.open("w") as f:
        for i in range(records):
            a, b = (int(x) for x in rng.integers(0, 10, size=2))
            if i % LONG_EVERY == 0:
                row = {
                    "prompt": f"think long: {a}+{b}=",
                    "completion": " ".join(str(k % 10) for k in range(max_tokens + 16)),
                }
            else:
                row = {"prompt": f"{a}+{b}=", "completion": str(a + b)}
            f.write(json.dumps(row) + "\n")


def measure(out: Path, iterations: int, settings: list[str]) -> dict:
    watched = watch_run(out, ROOT / "configs" / "tiny-arith.yaml", [f"iterations={iterations}", *settings])
    if watched.returncode != 0:
        raise SystemExit(f"run failed ({watched.returncode}); see {watched.log}")
    from rollout.archive import read_table

    rows = metrics(out)[1:]
    trained = sum(r["samples"] - r.get("partial/dropped_stale", 0) for r in rows)
    wall = sum(r["time/wall"] for r in rows)
    fills = [r["engine/step_fill"] for r in rows if "engine/step_fill" in r]
    lengths = np.array([len(x) for x in read_table(out, columns=["response_ids"])["response_ids"].to_pylist()])
    figures = {
        "samples_per_s": round(trained / wall, 2),
        "trained_samples": trained,
        "wall_s": round(wall, 1),
        "iteration_s": [round(r["time/wall"], 2) for r in rows],
        "engine_idle_fraction": round(1 - float(np.mean(fills)), 3) if fills else None,
        "answers_at_max_tokens": round(float((lengths >= lengths.max()).mean()), 3),
        "answers_le_8_tokens": round(float((lengths <= 8).mean()), 3),
        "command_s": round(watched.seconds, 1),
    }
    if any("partial/version_spread" in r for r in rows):
        figures.update(
            {
                "version_spread_max": max(r["partial/version_spread"] for r in rows),
                "version_spread_mean": round(float(np.mean([r["partial/version_spread"] for r in rows])), 2),
                "resumed_samples": sum(r["partial/resumed_samples"] for r in rows),
                "dropped_stale": sum(r["partial/dropped_stale"] for r in rows),
                "carried_over_mean": round(float(np.mean([r["partial/carried_over"] for r in rows])), 1),
            }
        )
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="setting for both runs")
    parser.add_argument(
        "--sft-steps", type=int, default=60, help="the warm-up's steps (the long answers are learnt by 60)"
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "long_tail.jsonl"
        long_tail_data(data, 2000, args.max_tokens)
        common = [
            f"data.prompts={data}",
            f"model.sft_steps={args.sft_steps}",
            "reward.rules=[{name: similarity}]",
            "rollout.max_staleness=1",
            "checkpoint_every=1000",
            f"rollout.sampling.max_tokens={args.max_tokens}",
            f"rollout.max_model_len={args.max_tokens + 64}",
            *args.set,
        ]
        without = measure(Path(tmp) / "without", args.iterations, common)
        with_partial = measure(Path(tmp) / "with", args.iterations, [*common, "rollout.partial_rollouts=true"])
    print(
        json.dumps(
            {
                "iterations": args.iterations,
                "max_tokens": args.max_tokens,
                "max_staleness": 1,
                "speedup": round(with_partial["samples_per_s"] / without["samples_per_s"], 3),
                "without": without,
                "with": with_partial,
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
