"""The collective weight sync's wire: one process group (gloo on CPU, NCCL on GPU) joining the learner
(rank 0) and every engine rank, and the weights sent through it in byte buckets.

Both ends use this file: `sender.py` (in learner rank 0) sends, `receiver.py` (inside each vLLM
worker) receives; both join through `open_weight_group`. The driver hosts the group's TCPStore and takes no part in the collectives; it only waits
on its actors, and can call off a sync whose peer died (`abandon`).

A sync is two steps, each bounded:
- a rendezvous in the store: every member counts itself in, then waits for the others (they may
  still be generating) up to `arrive_timeout_s`, or until the driver marks the sync abandoned;
- the buckets: one broadcast each, every one bounded by `op_timeout_s` (the process group's timeout),
  so a peer that dies mid-sync fails the others' collective instead of blocking it.
Weights are cast to the engine's dtype by the sender and packed into uint8 buffers of at most
`bucket_bytes` (a larger tensor goes alone), so every backend moves them the same way; the receiver
hands each bucket's tensors to the model's loader before it receives the next.
"""

from __future__ import annotations

import datetime as dt
import math
import time
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

import msgspec

from contracts.errors import JobFailure

if TYPE_CHECKING:  # torch is imported where it is used: the driver takes this file's structs on every job,
    import torch  # and torch's import (seconds) only where the sync is collective


ALIGN = 64  # byte offset of each tensor in a bucket: a multiple of every element size, so views are legal


class TensorSpec(msgspec.Struct, array_like=True, frozen=True):
    name: str
    shape: tuple[int, ...]
    offset: int  # bytes into its bucket


class Bucket(msgspec.Struct, array_like=True, frozen=True):
    nbytes: int
    tensors: tuple[TensorSpec, ...]


class SyncPlan(msgspec.Struct, frozen=True):
    """What every member needs to know to take part in one sync: the buckets, in order, the dtype, and
    tied tensors as (name, the name it is sent as): sent once, loaded under both names."""

    dtype: str
    buckets: tuple[Bucket, ...]
    tied: tuple[tuple[str, str], ...] = ()


def plan_buckets(
    shapes: list[tuple[str, tuple[int, ...]]], dtype: str, bucket_bytes: int, tied: tuple[tuple[str, str], ...] = ()
) -> SyncPlan:
    """Tensors (name, shape), in order, packed into buckets of at most `bucket_bytes` bytes each."""
    import torch

    width = getattr(torch, dtype).itemsize
    buckets: list[Bucket] = []
    current: list[TensorSpec] = []
    used = 0
    for name, shape in shapes:
        nbytes = width * math.prod(shape)
        start = -(-used // ALIGN) * ALIGN  # used rounded up to ALIGN
        if current and start + nbytes > bucket_bytes:
            buckets.append(Bucket(used, tuple(current)))
            current, start = [], 0
        current.append(TensorSpec(name, tuple(shape), start))
        used = start + nbytes
    if current:
        buckets.append(Bucket(used, tuple(current)))
    return SyncPlan(dtype, tuple(buckets), tuple(tied))


class SyncAbandoned(JobFailure):
    """The driver called the sync off (a member died before it began); nothing was loaded."""


class GroupAddress(msgspec.Struct, frozen=True):
    """Where and how a sync group forms: the driver's store, the group's epoch, its size and timeouts."""

    store_host: str
    store_port: int
    epoch: int
    world_size: int
    arrive_timeout_s: float
    op_timeout_s: float


def open_weight_group(address: GroupAddress, rank: int, device: torch.device) -> WeightGroup | None:
    """Join the group at `address` as `rank` (0 sends); None if the driver called the group off first."""
    try:
        return WeightGroup(address, rank, device)
    except SyncAbandoned:
        return None


class WeightGroup:
    """One member of the sync group. Rank 0 sends, the others receive."""

    def __init__(self, address: GroupAddress, rank: int, device: torch.device):
        import torch.distributed as dist

        self.rank, self.world_size, self.device = rank, address.world_size, device
        self.arrive_timeout_s = address.arrive_timeout_s
        store = dist.TCPStore(
            address.store_host,
            address.store_port,
            is_master=False,
            wait_for_workers=False,
            timeout=dt.timedelta(seconds=address.arrive_timeout_s),
        )
        self.store = dist.PrefixStore(f"weights/{address.epoch}", store)
        # Every member reaches the constructor below before any waits in it (it connects to all the
        # others), so its own timeout can be the short one.
        self.arrive("open")
        timeout = dt.timedelta(seconds=address.op_timeout_s)
        if device.type == "cuda":
            options = dist.ProcessGroupNCCL.Options()
            options._timeout = timeout
            self.group = dist.ProcessGroupNCCL(self.store, rank, address.world_size, options)
        else:
            self.group = dist.ProcessGroupGloo(self.store, rank, address.world_size, timeout)

    def ready(self, sync: int) -> bool:
        """Arrive at sync number `sync` and wait for every member: False if the driver called it off."""
        try:
            self.arrive(f"sync{sync}")
        except SyncAbandoned:
            return False
        return True

    def send(self, plan: SyncPlan, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Rank 0, after `arrive`: broadcast `weights` bucket by bucket (`fill_buckets`)."""
        for bucket in fill_buckets(plan, weights, self.device):
            self._broadcast(bucket)

    def receive(self, plan: SyncPlan) -> Iterator[tuple[str, torch.Tensor]]:
        """Ranks > 0, after `arrive`: (name, tensor) as each bucket arrives. Each bucket is a fresh
        buffer, since a loader may hold a layer's tensors until the layer is complete."""
        import torch

        dtype = getattr(torch, plan.dtype)
        for bucket in plan.buckets:
            buffer = torch.empty(bucket.nbytes, dtype=torch.uint8, device=self.device)
            self._broadcast(buffer)
            for spec in bucket.tensors:
                tensor = _view(buffer, spec, dtype)
                yield spec.name, tensor
                # vLLM's in-place reload takes a tied head apart like any other layer: it must be given
                # its tensor, or it keeps the old one.
                yield from ((name, tensor) for name, source in plan.tied if source == spec.name)

    def _broadcast(self, buffer: torch.Tensor) -> None:
        import torch
        import torch.distributed as dist

        options = dist.BroadcastOptions()
        options.rootRank = 0
        self.group.broadcast([buffer], options).wait()
        if self.device.type == "cuda":
            torch.cuda.current_stream().synchronize()

    def arrive(self, step: str) -> None:
        """Count in at `step` ("open", "sync3"), then wait for every member; raises SyncAbandoned if
        the driver calls the step off first, TimeoutError after `arrive_timeout_s`."""
        self.store.set(_arrived(step, self.rank), "1")
        everyone = [_arrived(step, r) for r in range(self.world_size)]
        deadline = time.monotonic() + self.arrive_timeout_s
        while not self.store.check(everyone):
            if self.store.check([f"{step}/abandoned"]):
                raise SyncAbandoned(f"weight sync step {step} was called off by the driver")
            if time.monotonic() > deadline:
                here = sum(self.store.check([key]) for key in everyone)
                raise TimeoutError(
                    f"only {here} of {self.world_size} members of the weight-sync group arrived "
                    f"within {self.arrive_timeout_s:.0f}s"
                )
            time.sleep(0.02)


def _arrived(step: str, rank: int) -> str:
    return f"{step}/rank{rank}"


def fill_buckets(
    plan: SyncPlan, weights: Iterable[tuple[str, torch.Tensor]], device: torch.device
) -> Iterator[torch.Tensor]:
    """Each bucket of `plan`, filled from `weights` ((name, tensor) of any dtype, on any device, in the plan's
    order; names the plan leaves out, such as a tied head, are passed over) in one buffer on `device`:
    each tensor is cast as it is copied in, so the extra memory is one bucket and nothing leaves the
    device. A bucket is valid until the next is asked for; the rest of `weights` is read to the end (a
    sharded learner gathers each tensor with every rank)."""
    import torch

    dtype = getattr(torch, plan.dtype)
    stream = iter(weights)
    buffer = torch.empty(max(b.nbytes for b in plan.buckets), dtype=torch.uint8, device=device)
    for bucket in plan.buckets:
        for spec in bucket.tensors:
            _view(buffer, spec, dtype).copy_(_next_named(stream, spec.name).reshape(spec.shape))
        yield buffer[: bucket.nbytes]
    for _ in stream:
        pass


def _next_named(stream: Iterator[tuple[str, torch.Tensor]], name: str) -> torch.Tensor:
    """The tensor called `name` next in `stream`, passing over the ones before it."""
    for found, tensor in stream:
        if found == name:
            return tensor
    raise RuntimeError(f"the sync plan's {name} is not among the weights sent, or not in the plan's order")


def _view(buffer: torch.Tensor, spec: TensorSpec, dtype: torch.dtype) -> torch.Tensor:
    return buffer[spec.offset : spec.offset + dtype.itemsize * math.prod(spec.shape)].view(dtype).view(spec.shape)


class SyncStore:
    """The driver's end: hosts the TCPStore every member connects to, and can call a step off."""

    def __init__(self, host: str):
        import torch.distributed as dist

        self.host = host
        self.store = dist.TCPStore(host, 0, is_master=True, wait_for_workers=False, timeout=dt.timedelta(seconds=30))
        self.port = self.store.port

    def abandon(self, epoch: int, step: str) -> None:
        self.store.set(f"weights/{epoch}/{step}/abandoned", "1")

    def absent(self, epoch: int, step: str, world_size: int) -> list[int]:
        """The ranks that have not arrived at `step`."""
        return [r for r in range(world_size) if not self.store.check([f"weights/{epoch}/{_arrived(step, r)}"])]

    def arrived(self, epoch: int, step: str, world_size: int) -> int:
        return world_size - len(self.absent(epoch, step, world_size))
