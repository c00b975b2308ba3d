"""An evaluation's figures: pass@k (the unbiased estimator of Chen et al. 2021, "Evaluating Large Language
Models Trained on Code"), mean@k, the reward and its components, the response length. Pure functions of
the reward columns; `rollout eval`, the job and the offline readers share them."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa

EVAL_FILE = "metrics.jsonl"  # RUN/eval/metrics.jsonl: one line per evaluation


def pass_at_k(n: int, c: int, k: int) -> float:
    """The probability that at least one of k samples drawn without replacement from n, c of them correct,
    is correct: 1 - C(n-c, k) / C(n, k)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n (n {n}, c {c}, k {k})")
    if n - c < k:  # every draw of k holds a correct one
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def correctness(rewards: np.ndarray, threshold: float) -> np.ndarray:
    """A sample is correct where its reward is at least `threshold` (a NaN reward is not)."""
    return np.nan_to_num(rewards, nan=-np.inf) >= threshold


def eval_figures(
    prompt_ids: list[str], rewards: np.ndarray, components: dict[str, np.ndarray], tokens: int, k: int, threshold: float
) -> dict[str, float]:
    """`eval/reward_mean`, `eval/<component>/mean`, `eval/pass@k` and `eval/mean@k` (over prompts, each
    prompt's n samples giving its estimate), `eval/response_tokens` (mean per sample), `eval/prompts`,
    `eval/samples`, `eval/k`."""
    correct = correctness(rewards, threshold)
    by_prompt: dict[str, list[bool]] = {}
    for prompt_id, ok in zip(prompt_ids, correct.tolist()):
        by_prompt.setdefault(prompt_id, []).append(ok)
    passes = [pass_at_k(len(oks), sum(oks), min(k, len(oks))) for oks in by_prompt.values()]
    means = [sum(oks) / len(oks) for oks in by_prompt.values()]
    samples = len(rewards)
    figures = {
        "eval/reward_mean": float(np.nanmean(rewards)) if samples and not np.isnan(rewards).all() else float("nan"),
        "eval/pass@k": float(np.mean(passes)) if passes else float("nan"),
        "eval/mean@k": float(np.mean(means)) if means else float("nan"),
        "eval/response_tokens": tokens / max(samples, 1),
        "eval/prompts": len(by_prompt),
        "eval/samples": samples,
        "eval/k": k,
    }
    for name, values in components.items():
        ok = values[~np.isnan(values)]
        figures[f"eval/{name}/mean"] = float(ok.mean()) if ok.size else float("nan")
    return figures


def reward_arrays(rewards: list[pa.RecordBatch]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """The total reward and each component's values, over the batches' rows in order."""
    if not rewards:
        return np.zeros(0), {}
    total = np.concatenate([r.column("reward").to_numpy(zero_copy_only=False) for r in rewards]).astype(np.float64)
    structs = pa.chunked_array([r.column("reward_components") for r in rewards]).combine_chunks()
    components = {
        field.name: child.to_numpy(zero_copy_only=False).astype(np.float64)
        for field, child in zip(structs.type, structs.flatten())
    }
    return total, components


def eval_line(figures: dict) -> str:
    """The console's line for one evaluation."""
    parts = [
        f"eval after iter {figures['eval/iteration']}" if figures["eval/iteration"] >= 0 else "eval at start",
        f"v{figures['eval/policy_version']}",
        f"pass@{figures['eval/k']} {figures['eval/pass@k']:.3f}",
        f"mean@{figures['eval/k']} {figures['eval/mean@k']:.3f}",
        f"reward {figures['eval/reward_mean']:+.3f}",
    ]
    parts += [
        f"{key[5:-5]} {value:.3f}"
        for key, value in figures.items()
        if key.endswith("/mean") and key.count("/") == 2 and value == value
    ]
    parts += [f"len {figures['eval/response_tokens']:.1f}", f"{figures['eval/prompts']} prompts"]
    if "time/eval" in figures:
        parts.append(f"{figures['time/eval']:.1f}s")
    return "  ".join(parts)
