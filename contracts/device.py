"""Where learning (and, by the same rule, generation) runs: `auto` is cuda when a GPU is visible."""

from __future__ import annotations


def resolve_device(device: str) -> str:
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"
