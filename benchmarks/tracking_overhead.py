"""What the trackers cost a job: the same run with no tracker, then with all three at once.

`rollout run` of `configs/tiny-arith.yaml` for `--iterations` (40) iterations, once with
`tracking.backends=[]` and once with `[tensorboard,wandb,mlflow]` (W&B offline, MLflow's SQLite store
in the run directory, a sample table every 5 iterations), each watched by `job_watch` (every process's
memory). Prints JSON: per run the median iteration wall time over iterations 5 onward, the command's
seconds and the driver's peak RSS; `wall_ratio` and `driver_peak_ratio` (all three / none), and
`end_s_delta`, the extra seconds from the last iteration's line to the command's exit (closing the
tracker runs).

    .venv/bin/python benchmarks/tracking_overhead.py [--iterations 40]
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

WARM = 5
ALL = ["tracking.backends=[tensorboard,wandb,mlflow]", "tracking.wandb.mode=offline", "tracking.samples_every=5"]


def measure(out: Path, iterations: int, settings: list[str]) -> dict:
    watched = watch_run(out, ROOT / "configs" / "tiny-arith.yaml", [f"iterations={iterations}", *settings])
    if watched.returncode != 0:
        raise SystemExit(f"run failed ({watched.returncode}); see {watched.log}")
    rows = metrics(out)
    run_s = sum(r["time/wall"] for r in rows)
    return {
        "s_per_iteration": round(statistics.median(r["time/wall"] for r in rows[WARM:]), 4),
        "command_s": round(watched.seconds, 1),
        "after_last_iteration_s": round(watched.seconds - watched.first_line_s - run_s + rows[0]["time/wall"], 1),
        "driver_peak_mb": round(watched.peak_by_kind().get("driver", 0.0), 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=40)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        none = measure(Path(tmp) / "none", args.iterations, ["tracking.backends=[]"])
        tracked = measure(Path(tmp) / "all", args.iterations, ALL)
    print(
        json.dumps(
            {
                "iterations": args.iterations,
                "none": none,
                "all_three": tracked,
                "wall_ratio": round(tracked["s_per_iteration"] / none["s_per_iteration"], 3),
                "driver_peak_ratio": round(tracked["driver_peak_mb"] / none["driver_peak_mb"], 3),
                "end_s_delta": round(tracked["after_last_iteration_s"] - none["after_last_iteration_s"], 1),
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
