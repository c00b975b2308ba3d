"""What held-out evaluation costs a job: the default job (`configs/tiny-arith.yaml`) for `--iterations` (20)
iterations, without an eval section and with 200 held-out prompts (`builtin:arith` at seed + 1, greedy, k = 1)
evaluated at the start, every 5 iterations and at the end.

The run's wall time is every metrics line's `time/wall` but the first's, which holds the start-up (model, SFT
warm-up, engines: the same with and without), plus the first iteration's own stages (`time/iteration`, the
start's evaluation included). Prints JSON: per run that wall, the command's seconds and the evaluations seen
(`eval_s`: each one's seconds from launch to its figures, `eval_wait_s`: what the loop waited for them);
`wall_ratio` (with / without; the issue's bound is 1.15). `--max-staleness 1` runs both at
rollout.max_staleness 1, where an evaluation overlaps the learner.

    .venv/bin/python benchmarks/eval_overhead.py [--iterations 20] [--max-staleness 0]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from job_watch import ROOT, metrics, watch_run  # noqa: E402

EVAL = ["eval.prompts=builtin:arith", "eval.every=5", "eval.max_prompts=200"]


def measure(out: Path, iterations: int, settings: list[str]) -> dict:
    watched = watch_run(out, ROOT / "configs" / "tiny-arith.yaml", [f"iterations={iterations}", *settings])
    if watched.returncode != 0:
        raise SystemExit(f"run failed ({watched.returncode}); see {watched.log}")
    rows = metrics(out)
    wall = rows[0]["time/iteration"] + sum(r["time/wall"] for r in rows[1:])
    evaluations = [r for r in rows if "eval/pass@k" in r]
    return {
        "run_s": round(wall, 2),
        "command_s": round(watched.seconds, 1),
        "evaluations": len(evaluations),
        "eval_wait_s": round(sum(r.get("time/eval_wait", 0.0) for r in evaluations), 2),
        "eval_s": [round(r["time/eval"], 2) for r in evaluations],
        "eval_pass@1": [round(r["eval/pass@k"], 3) for r in evaluations],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--max-staleness", type=int, default=0)
    args = parser.parse_args()
    common = [f"rollout.max_staleness={args.max_staleness}", "checkpoint_every=1000"]
    with tempfile.TemporaryDirectory() as tmp:
        without = measure(Path(tmp) / "without", args.iterations, common)
        with_eval = measure(Path(tmp) / "with", args.iterations, [*common, *EVAL])
    print(
        json.dumps(
            {
                "iterations": args.iterations,
                "max_staleness": args.max_staleness,
                "held_out_prompts": 200,
                "every": 5,
                "without_eval": without,
                "with_eval": with_eval,
                "wall_ratio": round(with_eval["run_s"] / without["run_s"], 3),
                "bound": 1.15,
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
