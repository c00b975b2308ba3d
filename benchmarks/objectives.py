"""What the training objectives cost on this CPU: dynamic sampling in the whole default job, and LoRA against
full fine-tuning in the learner.

Dynamic sampling: `rollout run` of the default job (configs/tiny-arith.yaml) for `--iterations`, with
`rollout.dynamic_sampling.enabled` off, then on, each as a user starts it (engine, rewards, learner,
archive and disk included). Seconds per iteration are the mean of `time/wall` in metrics.jsonl over the
iterations after the first two (start-up and the engine's warm-up).

LoRA: one learner per process (so each peak RSS is its own) on batches of the default job's shape (its
prompts_per_iteration x n_samples samples, prompts and responses of its lengths), `--updates` PPO updates
after one to warm up; the same with `learner.lora.rank` set. Also on `builtin:small-llama` (~21M), where
the weights, not the activations, dominate.

Prints one JSON object: `dynamic_sampling_cost_ratio` (seconds per iteration on / off),
`filtered_fraction` (groups without a signal / groups generated, with it on), `lora_update_ratio` and
`lora_peak_rss_ratio` (LoRA / full, the default job's model; goals < 1), and the figures behind them.

    .venv/bin/python benchmarks/objectives.py [--iterations 12] [--updates 5] [--skip-job]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

DEFAULT = ROOT / "configs" / "tiny-arith.yaml"


def job_figures(iterations: int) -> dict:
    from job_process import rollout_cli, run_args

    figures = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, enabled in (("off", "false"), ("on", "true")):
            out = Path(tmp) / name
            settings = [f"iterations={iterations}", f"rollout.dynamic_sampling.enabled={enabled}"]
            rollout_cli(*run_args(out, *settings, config=DEFAULT), timeout=3600)
            lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][2:]
            figures[name] = {
                "s_per_iteration": sum(line["time/wall"] for line in lines) / len(lines),
                "samples_per_iteration": sum(line["samples"] for line in lines) / len(lines),
                "trained_samples_per_iteration": sum(line["trained_samples"] for line in lines) / len(lines),
            }
            if enabled == "true":
                groups = sum(line["samples"] for line in lines) / 4  # the default job's n_samples
                figures[name]["filtered_fraction"] = (
                    sum(line["dynamic_sampling/filtered_groups"] for line in lines) / groups
                )
                figures[name]["rounds_mean"] = sum(line["dynamic_sampling/rounds"] for line in lines) / len(lines)
    return {
        "dynamic_sampling_cost_ratio": figures["on"]["s_per_iteration"] / figures["off"]["s_per_iteration"],
        "filtered_fraction": figures["on"]["filtered_fraction"],
        "dynamic_sampling": figures,
    }


def learner_worker(model: str, lora: bool, updates: int) -> dict:
    """In its own process: seconds per update and peak RSS of a learner, full or LoRA."""
    import random

    import numpy as np

    from contracts.builtin_model import resolve_model_path
    from contracts.config.load import load_config
    from learner.learner import Learner
    from learner.samples import SampleBatch, flatten

    settings = [f"model.path={model}", "learner.device=cpu", *(["learner.lora.rank=8"] if lora else [])]
    cfg = load_config(DEFAULT, settings)
    learner = Learner(cfg.learner, resolve_model_path(model), dtype=cfg.model.dtype, seed=cfg.seed)
    rng = random.Random(0)
    n, prompts = cfg.rollout.n_samples, cfg.rollout.prompts_per_iteration
    vocab = 200

    def batch() -> SampleBatch:
        prompt_ids, response_ids = [], []
        for _ in range(prompts):
            prompt = [1] + [rng.randrange(5, vocab) for _ in range(rng.randint(8, 14))]
            for _ in range(n):
                prompt_ids.append(prompt)
                response_ids.append(
                    [rng.randrange(5, vocab) for _ in range(rng.randint(2, cfg.rollout.sampling.max_tokens))]
                )
        (p, po), (r, ro) = flatten(prompt_ids, np.int32), flatten(response_ids, np.int32)
        rewards = np.array([rng.random() < 0.3 for _ in response_ids], dtype=np.float32)
        groups = np.repeat(np.arange(prompts), n).astype(np.int64)
        return SampleBatch(p, po, r, ro, np.full(len(r), -1.0, np.float32), rewards, groups)

    learner.learn(batch())  # warm-up: allocations, the optimizer's state
    start = time.perf_counter()
    for _ in range(updates):
        learner.learn(batch())
    seconds = (time.perf_counter() - start) / updates
    trainable = (
        sum(p.numel() for p in learner.trainable_parameters()) if hasattr(learner, "trainable_parameters") else None
    )
    return {
        "s_per_update": seconds,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "trainable_parameters": trainable,
    }


def lora_figures(updates: int) -> dict:
    rows = {}
    for model in ("builtin:tiny-llama", "builtin:small-llama"):
        for lora in (False, True):
            proc = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--learner-worker",
                    model,
                    *(["--lora"] if lora else []),
                    "--updates",
                    str(updates),
                ],
                capture_output=True,
                text=True,
                timeout=3600,
                check=True,
            )
            rows[f"{model.split(':')[1]}/{'lora' if lora else 'full'}"] = json.loads(proc.stdout.splitlines()[-1])
    full, lora = rows["tiny-llama/full"], rows["tiny-llama/lora"]
    small_full, small_lora = rows["small-llama/full"], rows["small-llama/lora"]
    return {
        "lora_update_ratio": lora["s_per_update"] / full["s_per_update"],
        "lora_peak_rss_ratio": lora["peak_rss_mb"] / full["peak_rss_mb"],
        "small_llama_lora_update_ratio": small_lora["s_per_update"] / small_full["s_per_update"],
        "small_llama_lora_peak_rss_ratio": small_lora["peak_rss_mb"] / small_full["peak_rss_mb"],
        "learner": rows,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=12)
    parser.add_argument("--updates", type=int, default=5)
    parser.add_argument("--skip-job", action="store_true", help="the LoRA figures only")
    parser.add_argument("--skip-lora", action="store_true", help="the dynamic sampling figures only")
    parser.add_argument("--learner-worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--lora", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.learner_worker:
        print(json.dumps(learner_worker(args.learner_worker, args.lora, args.updates)))
        return
    out = {}
    if not args.skip_job:
        out.update(job_figures(args.iterations))
    if not args.skip_lora:
        out.update(lora_figures(args.updates))
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
