"""Time the vectorised `gae` against the per-sample Python loop `gae_reference`; print JSON.

The batch looks like a PPO iteration: right-padded responses of random length (a tenth cut at the
maximum length, as `finish_reason=length` responses are), rewards from `token_rewards` (a KL penalty
per token plus a score on the last one) and random critic values. The reference loop is timed on
the first `--ref-rows` rows only and scaled linearly per row to the whole batch, which its cost is
(each row is an independent loop). The two are also compared on those rows.

Torch runs on one CPU thread by default, as the Python loop does, so the speed-up is the algorithm's
and not extra cores'; on a shared machine, multi-threaded timings also swing with other load.

    python benchmarks/gae.py [--batch 4096 --time 512 --ref-rows 256 --device cpu]
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import time
from collections.abc import Callable
from typing import TypeVar

import torch

from learner.advantages import gae, gae_reference, token_rewards

Result = TypeVar("Result")


def make_batch(
    batch: int, steps: int, device: torch.device, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, steps + 1, (batch,), generator=gen)
    lengths[torch.rand(batch, generator=gen) < 0.1] = steps
    mask = torch.arange(steps) < lengths.unsqueeze(1)
    logprobs = -torch.rand(batch, steps, generator=gen) * 3
    ref_logprobs = logprobs + 0.1 * torch.randn(batch, steps, generator=gen)
    scores = torch.randn(batch, generator=gen)
    rewards, _ = token_rewards(scores, logprobs, ref_logprobs, mask, kl_coef=0.05)
    values = torch.randn(batch, steps, generator=gen)
    return rewards.to(device), values.to(device), mask.to(device)


def timed(fn: Callable[[], Result], device: torch.device) -> tuple[float, Result]:
    """Wall-clock seconds of one call, waiting for queued GPU work on both sides."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    result = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--time", type=int, default=512)
    parser.add_argument("--ref-rows", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--gamma", type=float, default=1.0)
    parser.add_argument("--lam", type=float, default=0.95)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads; 0: torch's choice")
    args = parser.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)

    device = torch.device(args.device)
    rewards, values, mask = make_batch(args.batch, args.time, device, args.seed)
    run_gae = functools.partial(gae, rewards, values, mask, args.gamma, args.lam)
    timed(run_gae, device)  # warm-up: first-call allocation and kernel selection
    gae_times = [timed(run_gae, device)[0] for _ in range(args.repeats)]
    gae_seconds = statistics.median(gae_times)

    rows = slice(0, args.ref_rows)
    run_reference = functools.partial(gae_reference, rewards[rows], values[rows], mask[rows], args.gamma, args.lam)
    ref_times = []
    for _ in range(3):
        seconds, (ref_advantages, ref_returns) = timed(run_reference, device)
        ref_times.append(seconds)
    ref_seconds = statistics.median(ref_times)
    advantages, returns = run_gae()
    max_abs_diff = max(
        (advantages[rows] - ref_advantages).abs().max().item(),
        (returns[rows] - ref_returns).abs().max().item(),
    )
    ref_seconds_scaled = ref_seconds * args.batch / args.ref_rows

    print(
        json.dumps(
            {
                "benchmark": "gae",
                "shape": [args.batch, args.time],
                "valid_tokens": int(mask.sum().item()),
                "gamma": args.gamma,
                "lam": args.lam,
                "device": str(device),
                "torch_threads": torch.get_num_threads(),
                "gae_seconds_median": round(gae_seconds, 6),
                "gae_seconds_min": round(min(gae_times), 6),
                "gae_repeats": args.repeats,
                "reference_rows_measured": args.ref_rows,
                "reference_repeats": len(ref_times),
                "reference_seconds_measured_median": round(ref_seconds, 6),
                "reference_seconds_scaled_to_batch": round(ref_seconds_scaled, 6),
                "reference_scaling": f"timed on {args.ref_rows} rows, scaled per row to the batch",
                "speedup_median": round(ref_seconds_scaled / gae_seconds, 1),
                "max_abs_diff": max_abs_diff,
            }
        )
    )


if __name__ == "__main__":
    main()
