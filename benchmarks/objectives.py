"""What the training objectives cost on this CPU: dynamic sampling in the whole default job, and LoRA against
full fine-tuning in the learner.

Dynamic sampling: `rollout run` of the default job (configs/tiny-arith.yaml) for `--iterations`, with
`rollout.dynamic_sampling.enabled` off, then on, each as a user starts it (engine, rewards, learner,
archive and disk included). Seconds per iteration are the mean of `time/wall` in metrics.jsonl over the
iterations after the first two (start-up and the engine's warm-up).

LoRA: `benchmarks/lora_cost.py` (its docstring says how: one learner per process, built as the default job
builds it, fed batches of its shape; full against configs/tiny-arith-lora.yaml's learner, the kinds
alternating for `--rounds`), on the default job's model and on `builtin:small-llama` (20.8M), where the
weights and their optimizer state, not the libraries, make the learner's memory.

Prints one JSON object: `dynamic_sampling_cost_ratio` (seconds per iteration on / off),
`filtered_fraction` (groups without a signal / groups generated, with it on), `lora_update_ratio` and
`lora_peak_rss_ratio` (LoRA / full, the default job's model; goals < 1), and the figures behind them.

    .venv/bin/python benchmarks/objectives.py [--iterations 12] [--updates 3] [--rounds 2] [--skip-job] [--skip-lora]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
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


def lora_figures(updates: int, rounds: int) -> dict:
    """`lora_cost.py` on the default job's model (the issue's ratios) and on `builtin:small-llama`."""
    from lora_cost import lora_cost

    tiny = lora_cost("builtin:tiny-llama", updates, rounds)
    small = lora_cost("builtin:small-llama", updates, rounds)
    return {
        "lora_update_ratio": tiny["lora_update_ratio"],
        "lora_peak_rss_ratio": tiny["lora_peak_rss_ratio"],
        "small_llama_lora_update_ratio": small["lora_update_ratio"],
        "small_llama_lora_peak_rss_ratio": small["lora_peak_rss_ratio"],
        "lora": {"tiny-llama": tiny, "small-llama": small},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=12)
    parser.add_argument("--updates", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2, help="LoRA: each kind's processes, alternating")
    parser.add_argument("--skip-job", action="store_true", help="the LoRA figures only")
    parser.add_argument("--skip-lora", action="store_true", help="the dynamic sampling figures only")
    args = parser.parse_args()
    out = {}
    if not args.skip_job:
        out.update(job_figures(args.iterations))
    if not args.skip_lora:
        out.update(lora_figures(args.updates, args.rounds))
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
