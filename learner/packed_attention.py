"""Attention that never crosses sequences in a packed row, as transformers attention functions.

A packed micro-batch (`learner.batch`) is one row of sequences back to back, with no attention mask;
its boundaries reach every attention call as the kwargs transformers passes through its models,
`cu_seq_lens_q/k` ((N + 1,) int32 starts) and `max_length_q/k` (int), the ones its own
flash-attention path reads. Left to transformers' SDPA, a packed row gets one dense (Σ L)² block mask
(twice the time of a padded pass on an H200 at 16K tokens); these cost Σ L_i² instead:

- `ppo_varlen_torch`: torch's `varlen_attn` (CUDA, bfloat16 / float16), torch >= 2.10;
- `ppo_varlen_fa`: flash-attn's `flash_attn_varlen_func`, where torch has no `varlen_attn`;
- `ppo_varlen_segments`: SDPA on each sequence, causal (CPU).

Each is registered in transformers' `AttentionInterface` under its name, with no mask function:
transformers then builds no mask for these names, and skips its own scan of the position ids for
packed sequences (a host sync per forward). A model set to one of them takes packed rows and single
sequences (causal SDPA); a padded batch of several rows, which needs the mask, is refused.
"""

from __future__ import annotations

import functools
import inspect
import warnings

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

TORCH_VARLEN = "ppo_varlen_torch"
FLASH_ATTN_VARLEN = "ppo_varlen_fa"
SEGMENTS = "ppo_varlen_segments"


def choose(device_type: str, compute_dtype: torch.dtype, kernels: tuple[str, ...] | None = None) -> str | None:
    """The attention implementation for packed micro-batches on this device, or None: pad instead
    (with a one-line warning). `kernels`: the CUDA varlen kernels importable here (default: look)."""
    if device_type != "cuda":
        return SEGMENTS
    kernels = available_kernels() if kernels is None else kernels
    if compute_dtype not in (torch.bfloat16, torch.float16):
        warnings.warn(
            f"learner.pack_sequences: varlen attention kernels take bfloat16/float16, not {compute_dtype}; "
            "micro-batches are padded",
            stacklevel=2,
        )
        return None
    for name in (TORCH_VARLEN, FLASH_ATTN_VARLEN):
        if name in kernels:
            return name
    warnings.warn(
        "learner.pack_sequences: neither torch.nn.attention.varlen (torch >= 2.10) nor flash-attn is available; "
        "micro-batches are padded",
        stacklevel=2,
    )
    return None


def available_kernels() -> tuple[str, ...]:
    return tuple(
        name for name, kernel in ((TORCH_VARLEN, _torch_varlen()), (FLASH_ATTN_VARLEN, _flash_varlen())) if kernel
    )


@functools.cache
def _torch_varlen():
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


@functools.cache
def _flash_varlen():
    try:
        from flash_attn import flash_attn_varlen_func
    except (ImportError, OSError):  # not installed, or built for another torch or CUDA
        return None
    return flash_attn_varlen_func


def _varlen(attend):
    """A transformers attention function that runs `attend(module, query, key, value, bounds, scaling,
    dropout)` on a packed row and causal SDPA on a single sequence."""

    def attention(
        module,
        query,
        key,
        value,
        attention_mask,
        dropout=0.0,
        scaling=None,
        sliding_window=None,
        cu_seq_lens_q=None,
        cu_seq_lens_k=None,
        max_length_q=None,
        max_length_k=None,
        **kwargs,
    ):
        if cu_seq_lens_q is None:
            if query.shape[0] != 1:
                raise ValueError("a padded batch of several rows reached a model set up for packed sequences")
            return _segments(module, query, key, value, (_whole(query),), scaling, dropout), None
        if sliding_window is not None and max_length_q > sliding_window:
            raise ValueError(
                f"a packed sequence of {max_length_q} tokens exceeds the model's sliding window ({sliding_window}); "
                "set learner.pack_sequences=false"
            )
        bounds = (cu_seq_lens_q, cu_seq_lens_k, max_length_q, max_length_k)
        return attend(module, query, key, value, bounds, scaling, dropout), None

    return attention


def _whole(query: torch.Tensor) -> torch.Tensor:
    return torch.tensor([0, query.shape[2]], dtype=torch.int32)


def _segments(module, query, key, value, bounds, scaling, dropout):
    """query (1, Hq, L, D), key and value (1, Hkv, L, D) -> (1, L, Hq, D): causal SDPA per sequence."""
    starts = bounds[0].tolist()  # a host tensor: this path runs on CPU
    gqa = query.shape[1] != key.shape[1]
    pieces = [
        F.scaled_dot_product_attention(
            query[:, :, s:e],
            key[:, :, s:e],
            value[:, :, s:e],
            dropout_p=dropout,
            is_causal=True,
            scale=scaling,
            enable_gqa=gqa,
        )
        for s, e in zip(starts[:-1], starts[1:])
    ]
    return torch.cat(pieces, dim=2).transpose(1, 2).contiguous()


@functools.cache
def _parameters(fn) -> frozenset[str]:
    return frozenset(inspect.signature(fn).parameters)


def _tokens_first(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(1, H, L, D) -> (L, H, D) contiguous in `dtype`: the varlen kernels' layout."""
    return x[0].transpose(0, 1).to(dtype).contiguous()


def _kernel_dtype(query: torch.Tensor) -> torch.dtype:
    """Autocast's dtype when on: rotary embeddings in float32 leave q and k float32 under autocast,
    and the kernels, unlike SDPA, are not on autocast's list."""
    if torch.is_autocast_enabled(query.device.type):
        return torch.get_autocast_dtype(query.device.type)
    return query.dtype


def _torch_varlen_attend(module, query, key, value, bounds, scaling, dropout):
    if dropout:
        raise ValueError("torch's varlen_attn has no attention dropout; set learner.pack_sequences=false")
    varlen_attn = _torch_varlen()
    dtype = _kernel_dtype(query)
    q, k, v = (_tokens_first(x, dtype) for x in (query, key, value))
    parameters = _parameters(varlen_attn)
    extra = {}
    if q.shape[1] != k.shape[1]:
        if "enable_gqa" in parameters:
            extra["enable_gqa"] = True
        else:  # torch < 2.12: one copy of the key-value heads per query head
            groups = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    if "window_size" in parameters:
        extra["window_size"] = (-1, 0)  # causal
    else:  # torch 2.10
        extra["is_causal"] = True
    cu_q, cu_k, max_q, max_k = bounds
    return varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, scale=scaling, **extra)[None]


def _flash_attn_attend(module, query, key, value, bounds, scaling, dropout):
    dtype = _kernel_dtype(query)
    q, k, v = (_tokens_first(x, dtype) for x in (query, key, value))
    cu_q, cu_k, max_q, max_k = bounds
    return _flash_varlen()(q, k, v, cu_q, cu_k, max_q, max_k, dropout_p=dropout, softmax_scale=scaling, causal=True)[
        None
    ]


for _name, _attend in (
    (TORCH_VARLEN, _torch_varlen_attend),
    (FLASH_ATTN_VARLEN, _flash_attn_attend),
    (SEGMENTS, _segments),
):
    AttentionInterface.register(_name, _varlen(_attend))
