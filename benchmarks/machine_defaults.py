"""Do the defaults use the machine? The 256 x 4 x 32 job with defaults, against the same job with
`learner.num_cpus_per_rank=2` (the fast setting issue 18 measured) and with `learner.num_threads=1`
(one torch thread per rank: what the default was before), runs alternating, in one process.

Prints JSON per setting: median wall seconds per iteration after the first two, the stage medians,
the reward's first -> last fifth (it must still learn) and start-up seconds (command start to the
first iteration's start); then each setting's seconds per iteration over the defaults'.

    .venv/bin/python benchmarks/machine_defaults.py [--iterations 10] [--repeats 1]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from job_watch import ROOT, metrics, watch_run  # noqa: E402

JOB = [
    "model.sft_warmup=false",
    "rollout.prompts_per_iteration=256",
    "rollout.sampling.max_tokens=32",
    "learner.minibatch_size=256",
    "checkpoint_every=1000",
]
SETTINGS = {
    "defaults": [],
    "num_cpus_per_rank=2": ["learner.num_cpus_per_rank=2"],
    "num_threads=1": ["learner.num_threads=1"],
}
STAGES = ("generate", "reward", "values", "update")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    runs: dict[str, list[dict]] = {name: [] for name in SETTINGS}
    with tempfile.TemporaryDirectory(prefix="defaults-") as tmp:
        for repeat in range(args.repeats):
            for name, extra in SETTINGS.items():
                out = Path(tmp) / f"{name}-{repeat}"
                watched = watch_run(
                    out, ROOT / "configs" / "tiny-arith.yaml", [*JOB, f"iterations={args.iterations}", *extra]
                )
                if watched.returncode != 0:
                    raise SystemExit(f"{name}: exit {watched.returncode}\n{watched.log.read_text()[-3000:]}")
                rows = metrics(out)
                fifth = max(1, len(rows) // 5)
                runs[name].append(
                    {
                        "seconds_per_iteration": statistics.median(r["time/wall"] for r in rows[2:]),
                        **{s: statistics.median(r[f"time/{s}"] for r in rows[2:]) for s in STAGES},
                        "reward_first_fifth": statistics.mean(r["reward_mean"] for r in rows[:fifth]),
                        "reward_last_fifth": statistics.mean(r["reward_mean"] for r in rows[-fifth:]),
                        "startup_s": watched.startup_s(rows),
                    }
                )
    figures = {
        name: {k: round(statistics.median(r[k] for r in results), 3) for k in results[0]}
        for name, results in runs.items()
    }
    base = figures["defaults"]["seconds_per_iteration"]
    for name in SETTINGS:
        figures[name]["over_defaults"] = round(figures[name]["seconds_per_iteration"] / base, 3)
    print(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
