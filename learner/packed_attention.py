"""Attention that never crosses sequences in a packed row, as transformers attention functions.

A packed micro-batch (`learner.batch`) is one row of sequences back to back, with no attention mask;
its boundaries reach every attention call as the kwargs transformers passes through its models,
`cu_seq_lens_q/k` ((N + 1,) int32 starts) and `max_length_q/k` (int), the ones its own
flash-attention path reads. Left to transformers' SDPA, a packed row gets one dense (Σ L)² block mask
(twice the time of a padded pass on an H200 at 16K tokens); these cost Σ L_i² instead (the CPU one a
little more: the padding within its groups):

- `ppo_varlen_torch`: torch's `varlen_attn` (CUDA, bfloat16 / float16), torch >= 2.10;
- `ppo_varlen_fa`: flash-attn's `flash_attn_varlen_func`, where torch has no `varlen_attn`;
- `ppo_varlen_segments`: SDPA on the sequences grouped by length, one causal call per group (CPU).

Each is registered in transformers' `AttentionInterface` under its name, with no mask function:
transformers then builds no mask for these names, and skips its own scan of the position ids for
packed sequences (a host sync per forward). A model set to one of them takes packed rows and single
sequences (causal SDPA); a padded batch of several rows, which needs the mask, is refused.
"""

from __future__ import annotations

import functools
import inspect
import warnings
from dataclasses import dataclass

import numpy as np
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
            return _single(module, query, key, value, scaling, dropout), None
        if sliding_window is not None and max_length_q > sliding_window:
            raise ValueError(
                f"a packed sequence of {max_length_q} tokens exceeds the model's sliding window ({sliding_window}); "
                "set learner.pack_sequences=false"
            )
        bounds = (cu_seq_lens_q, cu_seq_lens_k, max_length_q, max_length_k)
        return attend(module, query, key, value, bounds, scaling, dropout), None

    return attention


def _single(module, query, key, value, scaling, dropout):
    """query (1, Hq, L, D), key and value (1, Hkv, L, D) of one sequence -> (1, L, Hq, D): causal SDPA."""
    out = F.scaled_dot_product_attention(
        query, key, value, dropout_p=dropout, is_causal=True, scale=scaling, enable_gqa=query.shape[1] != key.shape[1]
    )
    return out.transpose(1, 2).contiguous()


# Bucket widths: a bucket takes sequences, shortest first, while its longest is at most
# max(GROWTH x its shortest, its shortest + SLACK) tokens, so at most about a fifth of a grid is padding
# (a few tokens more among the shortest), while lengths 1 to 512 need 16 SDPA calls, not one per sequence.
GROWTH = 1.25
SLACK = 8


@dataclass(frozen=True)
class Grids:
    """A packed row's sequences grouped by length into right-padded grids, one SDPA call each.

    `gather` (Σ_b N_b·W_b,) long: the packed position each grid cell reads, row-major per grid, grids
    one after another (a padding cell reads its own sequence's last token: finite, and never seen by a
    valid query, which under causal attention sees only earlier cells of its own row).
    `shapes`: (N_b, W_b) per grid, sequences by width. `scatter` (Σ L_i,) long: each packed position's cell.
    `in_place`: the grids are the packed row itself (each grid's sequences of one length, in the row's
    order, as a micro-batch of equal lengths comes): no gather or scatter needed.
    """

    gather: torch.Tensor
    shapes: tuple[tuple[int, int], ...]
    scatter: torch.Tensor
    in_place: bool


def buckets(lengths: np.ndarray) -> list[np.ndarray]:
    """(N,) sequence lengths -> the sequences of each bucket (indices, shortest first), buckets by width;
    empty sequences in none."""
    order = np.argsort(lengths, kind="stable")
    order = order[lengths[order] > 0]
    groups, first = [], 0
    for i in range(1, len(order) + 1):
        if i == len(order) or lengths[order[i]] > max(GROWTH * lengths[order[first]], lengths[order[first]] + SLACK):
            groups.append(order[first:i])
            first = i
    return groups


def grids(cu_seq_lens: np.ndarray) -> Grids:
    """(N + 1,) sequence starts in a packed row -> its `Grids`."""
    starts, lengths = cu_seq_lens[:-1], np.diff(cu_seq_lens)
    gather, shapes, scatter, cells = [], [], np.empty(int(cu_seq_lens[-1]), dtype=np.int64), 0
    for members in buckets(lengths):
        n, width = len(members), int(lengths[members].max())
        column = np.arange(width)[None]
        own = lengths[members][:, None]
        gather.append((starts[members][:, None] + np.minimum(column, own - 1)).ravel())
        valid = column < own
        scatter[(starts[members][:, None] + column)[valid]] = (cells + np.arange(n * width).reshape(n, width))[valid]
        shapes.append((n, width))
        cells += n * width
    gather = np.concatenate(gather)
    in_place = len(gather) == len(scatter) and bool((gather == np.arange(len(gather))).all())
    return Grids(torch.from_numpy(gather), tuple(shapes), torch.from_numpy(scatter), in_place)


class _LastGrids:
    """The grids of the packed rows seen last, by the identity of their bounds tensor: every layer and
    every pass over a micro-batch gets the same tensor, so its grids are built once. Holding the tensor
    keeps its id from being reused by another."""

    size = 8

    def __init__(self):
        self.entries: dict[int, tuple[torch.Tensor, Grids]] = {}

    def __call__(self, cu_seq_lens: torch.Tensor) -> Grids:
        entry = self.entries.get(id(cu_seq_lens))
        if entry is not None and entry[0] is cu_seq_lens:
            return entry[1]
        if len(self.entries) >= self.size:
            del self.entries[next(iter(self.entries))]
        built = grids(cu_seq_lens.cpu().numpy().astype(np.int64))
        self.entries[id(cu_seq_lens)] = (cu_seq_lens, built)
        return built


_grids_of = _LastGrids()


def _bucketed(module, query, key, value, bounds, scaling, dropout):
    """query (1, Hq, L, D), key and value (1, Hkv, L, D) -> (1, L, Hq, D): causal SDPA within each
    sequence, one call per bucket of similar lengths (`Grids`); right padding makes is_causal exact."""
    layout = _grids_of(bounds[0])
    sizes = [n * width for n, width in layout.shapes]

    def cells(x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(1, H, L, D) -> per grid (N_b·W_b, H, D). Split, not sliced: a split's backward is one
        concatenation, where each slice's would fill a whole zero gradient."""
        tokens = x[0].transpose(0, 1)
        return (tokens if layout.in_place else tokens.index_select(0, layout.gather.to(x.device))).split(sizes)

    q, k, v = (cells(x) for x in (query, key, value))
    outs = [
        F.scaled_dot_product_attention(
            *(x.unflatten(0, shape).transpose(1, 2) for x in (qb, kb, vb)),
            dropout_p=dropout,
            is_causal=True,
            scale=scaling,
            enable_gqa=query.shape[1] != key.shape[1],
        )
        .transpose(1, 2)
        .flatten(0, 1)
        for shape, qb, kb, vb in zip(layout.shapes, q, k, v)
    ]
    out = torch.cat(outs)
    return (out if layout.in_place else out.index_select(0, layout.scatter.to(out.device)))[None]


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
    (SEGMENTS, _bucketed),
):
    AttentionInterface.register(_name, _varlen(_attend))
