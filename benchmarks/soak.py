"""A long run of the default job: does any process's memory, or the iteration time, grow?

`rollout run` of `configs/tiny-arith.yaml` for `--iterations` (500) iterations, checkpoints at the
config's cadence, every process's RSS sampled each second with the iteration the run had logged.
Prints JSON: per process kind (driver, rollout, reward, learner) the RSS slope in MB per 100
iterations (least squares over iterations 10 onward, past the engine's and allocator's warm-up),
the same for its private memory (RssAnon: RSS less the shared object-store pages it touched) and
over the second half of the run alone, its RSS at iteration 10 and at the end; `wall_drift` = median iteration time over the last 50
iterations / over iterations 10-59, and the same ratio per stage, so a drift names its stage.
Bars (issue 18): slope <= 10 MB per 100 iterations, wall_drift <= 1.1.

    .venv/bin/python benchmarks/soak.py [--iterations 500] [--set K=V ...]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from job_watch import ROOT, mb_per_100, metrics, watch_run  # noqa: E402

WARM = 10  # iterations before the slope and the drift baseline start
STAGES = ("generate", "reward", "values", "advantages", "update", "weight_sync", "archive")


def slopes(watched) -> dict[str, dict[str, float]]:
    """Per kind (the process with the steepest RSS slope): MB per 100 iterations of RSS and of private
    memory (RssAnon), and the RSS at WARM and at the end."""
    out: dict[str, dict[str, float]] = {}
    for pid, kind in watched.kinds.items():
        points = [p for p in watched.samples.get(pid, []) if p[0] >= WARM]
        if len(points) < 10 or points[-1][0] - points[0][0] < 50:
            continue  # a process that did not live through the run (a restart's predecessor)
        x, rss, private = np.array(points, dtype=float).T
        slope = mb_per_100(x, rss)
        late = x >= (x[0] + x[-1]) / 2  # a growth that levels off shows here
        if kind not in out or slope > out[kind]["mb_per_100_iterations"]:
            out[kind] = {
                "mb_per_100_iterations": slope,
                "private_mb_per_100_iterations": mb_per_100(x, private),
                "second_half_mb_per_100_iterations": mb_per_100(x[late], rss[late]),
                "rss_mb_at_warm": round(float(rss[0]), 1),
                "rss_mb_at_end": round(float(rss[-1]), 1),
            }
    return out


def drift(rows: list[dict], key: str) -> float | None:
    early = [r[key] for r in rows[WARM : WARM + 50]]
    late = [r[key] for r in rows[-50:]]
    base = statistics.median(early) if early else 0
    return round(statistics.median(late) / base, 3) if base > 0 else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=500)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a setting for the run")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="soak-") as tmp:
        out = Path(tmp) / "run"
        watched = watch_run(
            out, ROOT / "configs" / "tiny-arith.yaml", [f"iterations={args.iterations}", *args.set], timeout_s=6 * 3600
        )
        if watched.returncode != 0:
            raise SystemExit(f"exit {watched.returncode}\n{watched.log.read_text()[-3000:]}")
        rows = metrics(out)
        checkpoints = sorted(p.name for p in (out / "checkpoints").glob("iter-*"))
    print(
        json.dumps(
            {
                "iterations": len(rows),
                "rss": slopes(watched),
                "wall_drift": drift(rows, "time/wall"),
                "stage_drift": {s: drift(rows, f"time/{s}") for s in STAGES},
                "median_wall_s": {
                    "iterations_10_59": round(statistics.median(r["time/wall"] for r in rows[WARM : WARM + 50]), 3),
                    "last_50": round(statistics.median(r["time/wall"] for r in rows[-50:]), 3),
                },
                "checkpoints_kept": checkpoints,
                "job_seconds": round(watched.seconds, 1),
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
