"""What `learner_gpu.py` and `learner_packing.py` run: model shapes and batches of mixed lengths.

Shapes: Qwen2.5-0.5B (hidden 896, 24 layers, intermediate 4864, 14 heads, 2 kv heads) and Qwen2.5-1.5B
(1536, 28, 8960, 12, 2), vocabulary 151936, tied embeddings, random weights built here from a
transformers config (no download); `tiny`, the builtin tiny Llama. Mixes: `uniform`, prompts and
responses of 192-256 tokens each; `realistic`, prompts of 32-256 and responses 30% 1-32, 50% 32-256,
20% at max_tokens (512), where random minibatches pad far more than a sorted batch.
Grid mixes (`learner_packing.py`), `<scale>-<spread>`: sequence lengths (prompt and response together)
of scale `short` 4-40, `medium` 48-80, `long` 256-512; spread `uniform` over the scale's range, `tailed`
mostly near its shortest with a long tail and a twentieth at its longest (responses cut at max_tokens),
`equal` all one length (the scale's middle), where padding wastes nothing.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from contracts.builtin_model import resolve_model_path
from learner.memory import Shape
from learner.samples import SampleBatch, offsets_of

QWEN25 = {"vocab_size": 151936, "tie_word_embeddings": True, "max_position_embeddings": 4096}
SHAPES = {
    "0.5b": {"hidden_size": 896, "num_hidden_layers": 24, "intermediate_size": 4864, "num_attention_heads": 14},
    "1.5b": {"hidden_size": 1536, "num_hidden_layers": 28, "intermediate_size": 8960, "num_attention_heads": 12},
}
# The largest budget whose estimate (learner.memory) fits an H200 with both graphs held, unpacked.
MAX_TOKENS = 512


def build_model(shape: str, device: torch.device, directory: Path) -> str:
    """A directory the Learner loads: the builtin tiny Llama, or a Qwen2.5 shape with random weights."""
    if shape == "tiny":
        return resolve_model_path("builtin:tiny-llama")
    from transformers import AutoModelForCausalLM, Qwen2Config

    config = Qwen2Config(**SHAPES[shape], **QWEN25, num_key_value_heads=2, use_sliding_window=False)
    torch.manual_seed(0)
    with torch.device(device):  # initialising 1.5B parameters on the host takes longer than the runs
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(directory)
    del model
    return str(directory)


SCALES = {"short": (4, 40), "medium": (48, 80), "long": (256, 512)}
SPREADS = ("uniform", "tailed", "equal")
GRID_MIXES = tuple(f"{scale}-{spread}" for scale in SCALES for spread in SPREADS)


def grid_lengths(mix: str, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Prompt and response lengths of a grid mix: each sequence split at 30-70% into prompt and response."""
    scale, spread = mix.split("-")
    shortest, longest = SCALES[scale]
    if spread == "uniform":
        total = rng.integers(shortest, longest + 1, n)
    elif spread == "tailed":
        tail = rng.exponential((longest - shortest) / 8, n)
        total = np.where(rng.random(n) < 0.05, longest, np.minimum(longest, shortest + tail).astype(np.int64))
    else:
        total = np.full(n, (shortest + longest) // 2)
        return total // 2, total - total // 2
    prompt = np.clip(np.round(total * rng.uniform(0.3, 0.7, n)).astype(np.int64), 1, total - 1)
    return prompt, total - prompt


def lengths(mix: str, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    if mix in GRID_MIXES:
        return grid_lengths(mix, n, rng)
    if mix == "uniform":
        return rng.integers(192, 257, n), rng.integers(192, 257, n)
    kind = rng.random(n)
    short, middle = rng.integers(1, 33, n), rng.integers(32, 257, n)
    return rng.integers(32, 257, n), np.where(kind < 0.3, short, np.where(kind < 0.8, middle, MAX_TOKENS))


def sample_batch(mix: str, n: int, vocab: int, seed: int = 0) -> SampleBatch:
    rng = np.random.default_rng(seed)
    return random_batch(*lengths(mix, n, rng), vocab, rng)


def random_batch(p: np.ndarray, t: np.ndarray, vocab: int, rng: np.random.Generator) -> SampleBatch:
    """Samples of prompt lengths `p` and response lengths `t`: random tokens and scores, four per prompt."""
    n = len(p)
    return SampleBatch(
        prompt_ids=rng.integers(6, vocab, int(p.sum())).astype(np.int32),
        prompt_offsets=offsets_of(p),
        response_ids=rng.integers(6, vocab, int(t.sum())).astype(np.int32),
        response_offsets=offsets_of(t),
        behaviour_logprobs=np.full(int(t.sum()), -5.0, dtype=np.float32),
        scores=rng.random(n).astype(np.float32),
        groups=np.arange(n) // 4,
    )


def shape_of(config) -> Shape:
    return Shape(
        hidden=config.hidden_size,
        layers=config.num_hidden_layers,
        intermediate=config.intermediate_size,
        vocab=config.vocab_size,
        heads=config.num_attention_heads,
        kv_heads=config.num_key_value_heads,
        tied=bool(config.tie_word_embeddings),
    )
