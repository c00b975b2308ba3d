"""The seeds' workload on this machine: the whole default job at 250 x 4, 1,000 x 4 and 5,000 x 4
prompts x samples per iteration, every process's memory watched.

Each size is `rollout run` of `configs/tiny-arith.yaml` (engine, reward worker, learner, archive,
checkpoints: nothing left out) in a process of its own, with `--iterations` iterations and a
builtin data set of at least twice the prompts per iteration. Prints JSON, per size:
`samples_per_iteration`, `seconds_per_iteration` (median wall seconds over the iterations after the
first), the stage breakdown (medians, same iterations), `peak_rss_mb` per process kind (the
kernel's VmHWM of the driver, each rollout worker, reward worker and learner rank; the largest of
each kind) and `seconds_per_sample`; then the ratios the issue's bars are stated in, against the
1,000 x 4 run: seconds per sample at 20K samples over that at 4K, and the largest process's peak.
`--config configs/tiny-calc.yaml` runs the same sizes as calculator episodes (an environment instance per
episode, the worker's environment threads, the turns' prompts) instead of single completions.

    .venv/bin/python benchmarks/seed_scale.py [--sizes 250,1000,5000] [--n 4] [--iterations 3] [--set K=V ...]
        [--config configs/tiny-arith.yaml]
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

STAGES = ("generate", "reward", "values", "advantages", "update", "weight_sync", "archive")


def one_size(prompts: int, args, root: Path) -> dict:
    out = root / f"p{prompts}"
    settings = [
        f"rollout.prompts_per_iteration={prompts}",
        f"rollout.n_samples={args.n}",
        f"data.builtin_size={max(2000, 2 * prompts)}",
        f"iterations={args.iterations}",
        *args.set,
    ]
    watched = watch_run(out, args.config, settings)
    if watched.returncode != 0:
        tail = watched.log.read_text()[-3000:]
        raise SystemExit(f"{prompts} x {args.n}: exit {watched.returncode}\n{tail}")
    rows = metrics(out)[1:] or metrics(out)
    samples = prompts * args.n
    seconds = statistics.median(r["time/wall"] for r in rows)
    result = {
        "prompts": prompts,
        "n_samples": args.n,
        "samples_per_iteration": samples,
        "seconds_per_iteration": round(seconds, 3),
        "stages": {s: round(statistics.median(r[f"time/{s}"] for r in rows), 3) for s in STAGES},
        "peak_rss_mb": watched.peak_by_kind(),
        "seconds_per_sample": seconds / samples,
        "job_seconds": round(watched.seconds, 1),
    }
    print(json.dumps(result), file=sys.stderr, flush=True)  # progress: one size at a time
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="250,1000,5000", help="prompts per iteration, comma-separated")
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--iterations", type=int, default=3)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="setting for every run")
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "tiny-arith.yaml", help="the job to scale")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    with tempfile.TemporaryDirectory(prefix="seed-scale-") as tmp:
        results = [one_size(p, args, Path(tmp)) for p in sizes]
    figures: dict = {"sizes": results}
    by_prompts = {r["prompts"]: r for r in results}
    if 1000 in by_prompts and 5000 in by_prompts:
        small, large = by_prompts[1000], by_prompts[5000]
        figures["seconds_per_sample_20k_over_4k"] = round(large["seconds_per_sample"] / small["seconds_per_sample"], 3)
        figures["largest_peak_rss_20k_over_4k"] = round(
            max(large["peak_rss_mb"].values()) / max(small["peak_rss_mb"].values()), 3
        )
    print(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
