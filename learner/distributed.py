"""The learner ranks' process group, FSDP2 sharding and the few collectives the learner itself makes.

With one rank nothing here touches torch.distributed: the models stay plain modules and every
collective is the identity, so a single learner needs no process group.
"""

from __future__ import annotations

import datetime as dt

import torch
import torch.distributed as dist
from torch import nn

from contracts.device import resolve_device

COLLECTIVE_TIMEOUT = dt.timedelta(minutes=10)  # a lost peer fails the collective instead of blocking forever


def init_process_group(rank: int, world_size: int, address: str, device: torch.device) -> None:
    """Join the learner group at `address` ("host:port", served by rank 0)."""
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(
        backend, init_method=f"tcp://{address}", rank=rank, world_size=world_size, timeout=COLLECTIVE_TIMEOUT
    )


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def shard(module: nn.Module, compute_dtype: torch.dtype) -> nn.Module:
    """FSDP2 over every transformer block, then the root; float32 master weights, compute in
    `compute_dtype`, gradients reduced in float32. FSDP averages gradients over the ranks, so a
    loss normalised by whole-minibatch counts is scaled by the world size before backward."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
    blocks = set()
    for sub in module.modules():
        blocks.update(getattr(sub, "_no_split_modules", None) or ())
    for sub in module.modules():
        if type(sub).__name__ in blocks:
            fully_shard(sub, mp_policy=policy)
    fully_shard(module, mp_policy=policy)
    return module


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    if world_size() > 1:
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def gather_rows(local: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """Every rank's (counts[rank], C) rows, concatenated in rank order on every rank."""
    if world_size() == 1:
        return local
    width = max(counts)
    padded = local.new_zeros((width, *local.shape[1:]))
    padded[: local.shape[0]] = local
    parts = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(parts, padded)
    return torch.cat([part[:n] for part, n in zip(parts, counts)])


def checkpoint_group():
    """A gloo group of every rank for the checkpoint writer's collectives, which run in its thread beside
    the learner's own: on the default group they could interleave with FSDP's. A collective to make."""
    return dist.new_group(backend="gloo")


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def local_device(setting: str) -> torch.device:
    device = torch.device(resolve_device(setting))
    if device.type == "cuda":
        return torch.device("cuda", torch.cuda.current_device())  # an explicit index: collectives compare devices
    return device
