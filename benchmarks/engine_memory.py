"""A rollout worker alone, in one process, over many iterations: which of its settings keep memory flat?

`soak.py` measures every process through the whole job; this runs what the rollout worker does in
it without Ray, the learner or the reward, so one worker's memory can be compared across settings.
Each configuration gets its own process (oneDNN reads its primitive-cache capacity once): a
`RolloutWorker` on the default job's SFT-warmed model, and per iteration the default job's
generation (`prompts_per_iteration` prompts of configs/tiny-arith.yaml in `chunks_per_worker`
chunks, `n_samples` each, a new seed each time), then a weight reload and the probe, as a weight
sync does. Configurations: oneDNN's primitive cache as the engine bounds it
(`rollout.generation.engine.ONEDNN_PRIMITIVE_CACHE_CAPACITY`) vs oneDNN's default (1,024), each
with `trim_heap` after the generation (as the actor does) and without. Prints JSON per
configuration: RSS slope in MB per 100 iterations (iterations 10 onward) and over the second half
alone, RSS at iteration 10 and at the end, and the median seconds of a generation call.

    .venv/bin/python benchmarks/engine_memory.py [--iterations 200]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from job_watch import ROOT, mb_per_100, memory_mb  # noqa: E402

sys.path.insert(0, str(ROOT))

WARM = 10  # iterations before the slope starts: the engine's and the allocator's warm-up
ONEDNN_DEFAULT_CAPACITY = 1024  # oneDNN's own default (its documentation: primitive cache)


def run_worker(iterations: int, trim: bool) -> dict:
    """One configuration, in this process; the capacity is whatever the environment holds."""
    from safetensors.torch import load_file

    from contracts.config.load import load_config
    from learner.sft import warm_start
    from rollout.driver.prompts import PromptSampler
    from rollout.driver.startup import read_data
    from rollout.generation.worker import RolloutWorker
    from rollout.runtime.heap import trim_heap

    cfg = load_config(ROOT / "configs" / "tiny-arith.yaml")
    data = read_data(cfg, sys.stderr)
    model = warm_start(data.base_model, data.prompts.records(), cfg.model, seed=cfg.seed, log=sys.stderr)
    worker = RolloutWorker("rollout-0", model, cfg.rollout, seed=cfg.seed)
    sampler = PromptSampler(size=len(data.prompts), seed=cfg.seed)
    per_chunk = -(-cfg.rollout.prompts_per_iteration // cfg.rollout.chunks_per_worker)
    rss, seconds = [], []
    for iteration in range(iterations):
        picked = [data.prompts.task(i) for i in data.prompts.draw(sampler, cfg.rollout.prompts_per_iteration)]
        chunks = [picked[i : i + per_chunk] for i in range(0, len(picked), per_chunk)]
        seeds = [cfg.seed + iteration * len(chunks) + c for c in range(len(chunks))]
        start = time.perf_counter()
        for _ in worker.generate(chunks, seeds, run_id="engine-memory", iteration=iteration):
            pass
        seconds.append(time.perf_counter() - start)
        if trim:
            trim_heap()
        # Fresh tensors each time, as a sync delivers them.
        worker.update_weights(iteration + 1, list(load_file(str(Path(model) / "model.safetensors")).items()))
        rss.append(memory_mb(os.getpid())["VmRSS"])
    x, y = np.arange(WARM, iterations, dtype=float), np.array(rss[WARM:])
    late = x >= (x[0] + x[-1]) / 2
    return {
        "mb_per_100_iterations": mb_per_100(x, y),
        "second_half_mb_per_100_iterations": mb_per_100(x[late], y[late]),
        "rss_mb_at_warm": round(rss[WARM], 1),
        "rss_mb_at_end": round(rss[-1], 1),
        "generate_seconds_median": round(statistics.median(seconds[WARM:]), 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=200)
    parser.add_argument("--worker", choices=["trim", "no-trim"], help=argparse.SUPPRESS)  # one configuration
    args = parser.parse_args()
    if args.iterations < 2 * WARM + 10:
        parser.error(f"--iterations must be at least {2 * WARM + 10} (the slope starts at iteration {WARM})")
    if args.worker:
        print(json.dumps(run_worker(args.iterations, args.worker == "trim")))
        return

    from rollout.generation.engine import ONEDNN_PRIMITIVE_CACHE_CAPACITY

    results = {}
    for capacity in (ONEDNN_PRIMITIVE_CACHE_CAPACITY, ONEDNN_DEFAULT_CAPACITY):
        for trim in ("trim", "no-trim"):
            name = f"onednn_cache_{capacity}_{trim.replace('-', '_')}"
            print(f"{name}: {args.iterations} iterations", file=sys.stderr, flush=True)
            env = {**os.environ, "ONEDNN_PRIMITIVE_CACHE_CAPACITY": str(capacity)}
            done = subprocess.run(
                [sys.executable, __file__, "--iterations", str(args.iterations), "--worker", trim],
                env=env,
                stdout=subprocess.PIPE,
                text=True,
                timeout=3600,
                check=True,
            )
            results[name] = json.loads(done.stdout.strip().splitlines()[-1])
    print(json.dumps({"iterations": args.iterations, "configurations": results}, indent=2))


if __name__ == "__main__":
    main()
