"""LoRA against full fine-tuning in the default job's learner: seconds per update and peak RSS.

    python benchmarks/lora_cost.py [--model builtin:small-llama] [--updates 2] [--rounds 2]
        [--mmap-threshold BYTES]

Each measurement is one learner in a fresh process (`ru_maxrss` only grows within one), built as the
default job builds its learner (configs/tiny-arith.yaml through `LearnerSpec.of_job`: gae with a separate
critic, two epochs, minibatches of 64, float32 on CPU, the job's torch threads) on `--model`, fed batches
of the job's shape (prompts_per_iteration x n_samples samples, 9-15 prompt tokens, 2 to max_tokens response
tokens, random tokens and 0/1 rewards): one `learn` to warm up, then `--updates` timed ones. LoRA is
configs/tiny-arith-lora.yaml's learner (rank 8 on every attention and MLP projection, a LoRA critic); the
same with `learner.lora.critic=full` is reported beside it. The processes alternate (full, LoRA, LoRA with
a full critic, full, ...) for `--rounds` rounds, so that other load on the machine falls on each alike;
figures are the medians over rounds.

Why `builtin:small-llama` (20.8M parameters) by default: the default job's own `builtin:tiny-llama` has
0.46M, so its weights, gradients and AdamW states are ~10 MB of a learner process whose RSS is ~600 MB of
libraries, and its update is mostly per-operator overhead: LoRA's savings (no weight gradients or optimizer
state for the base, no reference copy) are below the noise there. At 20.8M the states are ~0.7 GB and the
weight-gradient matmuls a third of the backward pass, as they are for real models. `--model
builtin:tiny-llama` measures the default job's model itself.

Peak RSS on CPU is glibc's as much as the learner's: freed temporaries stay in its heap (its mmap threshold
rises to the largest block freed, up to 32 MB). peft's own adapter forward made three output-sized
temporaries per adapted layer (B·A·x, its scaling, the sum), as much free memory as LoRA saved at these
sizes; the learner's adapted layers make none (one addmm, `learner/lora.py`), and on the default job's model
what is left over full fine-tuning is peft's import, about 12 MB, against the whole model's weights,
gradients and AdamW states of about 13 MB. `--mmap-threshold` (glibc's MALLOC_MMAP_THRESHOLD_ in the
measured processes) fixes the threshold, so blocks above it go back to the OS when freed and RSS follows
the live memory; the figures are given with the default allocator unless it is set.

Prints one JSON object: `lora_update_ratio` (LoRA / full seconds per `learn`: values, advantages and the
update), `lora_peak_rss_ratio` (LoRA / full peak RSS of the process), both goals < 1, the same two for the
full critic, and the figures behind them. `lora_cost(...)` returns the same dict to a caller.
No assertions on time.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

FULL = ROOT / "configs" / "tiny-arith.yaml"
LORA = ROOT / "configs" / "tiny-arith-lora.yaml"
KINDS = {
    "full": (FULL, []),
    "lora": (LORA, []),
    "lora_full_critic": (LORA, ["learner.lora.critic=full"]),
}


def worker(kind: str, model: str, updates: int) -> dict:
    """In its own process: one learner of `kind` on `model`; seconds per `learn` (and per stage) and peak RSS."""
    import random

    import numpy as np
    import torch

    from contracts.builtin_model import resolve_model_path
    from contracts.config.load import load_config
    from learner.samples import SampleBatch, flatten
    from rollout.actors.learner_spec import LearnerSpec

    path = resolve_model_path(model)
    baseline_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # libraries, no learner yet
    config, settings = KINDS[kind]
    cfg = load_config(config, [f"model.path={model}", "learner.device=cpu", *settings])
    learner = LearnerSpec.of_job(cfg, path).build()
    rng = random.Random(0)
    n, prompts, vocab = cfg.rollout.n_samples, cfg.rollout.prompts_per_iteration, learner.policy.lm.config.vocab_size

    def batch() -> SampleBatch:
        prompt_ids, response_ids = [], []
        for _ in range(prompts):
            prompt = [1] + [rng.randrange(6, vocab) for _ in range(rng.randint(8, 14))]
            for _ in range(n):
                prompt_ids.append(prompt)
                length = rng.randint(2, cfg.rollout.sampling.max_tokens)
                response_ids.append([rng.randrange(6, vocab) for _ in range(length)])
        (p, po), (r, ro) = flatten(prompt_ids, np.int32), flatten(response_ids, np.int32)
        rewards = np.array([rng.random() < 0.3 for _ in response_ids], dtype=np.float32)
        groups = np.repeat(np.arange(prompts), n).astype(np.int64)
        return SampleBatch(p, po, r, ro, np.full(len(r), -1.0, np.float32), rewards, groups)

    learner.learn(batch())  # warm-up: allocations, the optimizer's state
    stages: dict[str, list[float]] = {}
    start = time.perf_counter()
    for _ in range(updates):
        _, _, timings = learner.learn(batch())
        for stage, seconds in timings.items():
            stages.setdefault(stage, []).append(seconds)
    seconds = (time.perf_counter() - start) / updates
    return {
        "s_per_update": seconds,
        "stage_s": {stage: statistics.mean(v) for stage, v in stages.items()},
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "baseline_rss_mb": baseline_mb,
        "trained_parameters": sum(
            p.numel() for trained in learner.trained for g in trained.optimizer.param_groups for p in g["params"]
        ),
        "threads": torch.get_num_threads(),
    }


def _measure(kind: str, model: str, updates: int, mmap_threshold: int | None) -> dict:
    env = dict(os.environ)
    if mmap_threshold is not None:
        env["MALLOC_MMAP_THRESHOLD_"] = str(mmap_threshold)
    proc = subprocess.run(
        [sys.executable, __file__, "--worker", kind, "--model", model, "--updates", str(updates)],
        capture_output=True,
        text=True,
        timeout=3600,
        env=env,
    )
    if proc.returncode != 0:
        raise SystemExit(f"measuring {kind} on {model} failed:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"  {kind}: {result}", file=sys.stderr, flush=True)
    return result


def lora_cost(
    model: str = "builtin:small-llama", updates: int = 2, rounds: int = 2, mmap_threshold: int | None = None
) -> dict:
    """LoRA / full seconds per update and peak RSS on `model`, each learner a process of its own, the kinds
    alternating for `rounds` rounds (glibc's mmap threshold fixed at `mmap_threshold` bytes if given); the
    ratios of the medians and each kind's median figures."""
    from contracts.builtin_model import resolve_model_path

    resolve_model_path(model)  # build it once, before the measured processes
    runs: dict[str, list[dict]] = {kind: [] for kind in KINDS}
    for _ in range(rounds):
        for kind in KINDS:
            runs[kind].append(_measure(kind, model, updates, mmap_threshold))

    def median(kind: str, key: str) -> float:
        return statistics.median(run[key] for run in runs[kind])

    figures = {
        kind: {
            "s_per_update": median(kind, "s_per_update"),
            "peak_rss_mb": median(kind, "peak_rss_mb"),
            "learner_rss_mb": statistics.median(r["peak_rss_mb"] - r["baseline_rss_mb"] for r in rs),
            "trained_parameters": rs[0]["trained_parameters"],
            "stage_s": {stage: statistics.median(r["stage_s"][stage] for r in rs) for stage in rs[0]["stage_s"]},
        }
        for kind, rs in runs.items()
    }
    full, lora, full_critic = (figures[k] for k in KINDS)
    return {
        "model": model,
        "updates": updates,
        "rounds": rounds,
        "mmap_threshold": mmap_threshold,
        "lora_update_ratio": lora["s_per_update"] / full["s_per_update"],
        "lora_peak_rss_ratio": lora["peak_rss_mb"] / full["peak_rss_mb"],
        "lora_full_critic_update_ratio": full_critic["s_per_update"] / full["s_per_update"],
        "lora_full_critic_peak_rss_ratio": full_critic["peak_rss_mb"] / full["peak_rss_mb"],
        "learner_rss_ratio": lora["learner_rss_mb"] / full["learner_rss_mb"],  # above the libraries' RSS
        "figures": figures,
        "s_per_update_each_round": {kind: [round(r["s_per_update"], 3) for r in rs] for kind, rs in runs.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="builtin:small-llama")
    parser.add_argument("--updates", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--mmap-threshold", type=int, default=None, help="glibc MALLOC_MMAP_THRESHOLD_, bytes")
    parser.add_argument("--worker", choices=list(KINDS), default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.model, args.updates)))
        return
    print(json.dumps(lora_cost(args.model, args.updates, args.rounds, args.mmap_threshold), indent=2))


if __name__ == "__main__":
    main()
