"""The collective weight sync's wire (learner.weight_broadcast) across real processes over gloo."""

from __future__ import annotations

import multiprocessing as mp
import time

import torch

from rollout.weight_sync.wire import ALIGN, GroupAddress, SyncAbandoned, SyncStore, WeightGroup, plan_buckets


def test_buckets_hold_at_most_the_limit_and_a_larger_tensor_goes_alone():
    shapes = [("a", (10,)), ("b", (3, 4)), ("big", (100,)), ("c", (2,))]
    plan = plan_buckets(shapes, "float32", bucket_bytes=128)
    assert [[s.name for s in b.tensors] for b in plan.buckets] == [["a", "b"], ["big"], ["c"]]
    assert plan.buckets[0].tensors[1].offset == ALIGN  # 40 bytes of "a", rounded up
    assert [b.nbytes for b in plan.buckets] == [ALIGN + 48, 400, 8]
    assert (
        plan_buckets(shapes, "bfloat16", bucket_bytes=10**6).buckets[0].nbytes == 6 * ALIGN + 4
    )  # big (200 bytes) at 128, c at 384


def _weights() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "embed": torch.randn(7, 5, generator=g),
        "norm": torch.randn(5, generator=g),
        "head": torch.randn(3, 5, generator=g),
    }


def _member(rank: int, world: int, port: int, plan, die_after: int | None, out) -> None:
    try:
        address = GroupAddress("127.0.0.1", port, 0, world, arrive_timeout_s=20, op_timeout_s=3)
        group = WeightGroup(address, rank, torch.device("cpu"))
        if rank == 0:
            try:
                group.arrive("sync1")
                group.send(plan, _weights().items())
                out.put((rank, "sent", None))
            except RuntimeError as e:
                out.put((rank, "failed", str(e)))
            return
        got = {}
        group.arrive("sync1")
        for i, (name, tensor) in enumerate(group.receive(plan)):
            if die_after is not None and i == die_after:
                import os

                os._exit(1)  # a worker killed mid-sync
            got[name] = tensor.clone()
        out.put((rank, "received", {k: v.tolist() for k, v in got.items()}))
    except SyncAbandoned:
        out.put((rank, "abandoned", None))


def _run(world: int, plan, die: dict[int, int], join: list[int] | None = None, after=None):
    store = SyncStore("127.0.0.1")
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    ranks = join if join is not None else list(range(world))
    procs = [ctx.Process(target=_member, args=(r, world, store.port, plan, die.get(r), out)) for r in ranks]
    for p in procs:
        p.start()
    if after:
        after(store)
    results = {}
    expected = len(ranks) - len(die)
    while len(results) < expected:
        rank, what, payload = out.get(timeout=60)
        results[rank] = (what, payload)
    for p in procs:
        p.join(timeout=30)
    return results


def test_every_receiver_gets_the_senders_weights_in_the_engine_dtype():
    weights = _weights()
    plan = plan_buckets([(k, tuple(v.shape)) for k, v in weights.items()], "bfloat16", bucket_bytes=96)
    assert len(plan.buckets) > 1
    results = _run(3, plan, {})
    assert results[0][0] == "sent"
    for rank in (1, 2):
        what, got = results[rank]
        assert what == "received"
        for name, tensor in weights.items():
            assert torch.equal(torch.tensor(got[name], dtype=torch.bfloat16), tensor.to(torch.bfloat16)), name


def test_a_receiver_that_dies_mid_sync_fails_the_senders_collective():
    """The sender's broadcast fails on the dead peer (its op timeout is 3 s, its arrival timeout 20 s: the
    error is the collective's, not the arrival's)."""
    weights = _weights()
    plan = plan_buckets([(k, tuple(v.shape)) for k, v in weights.items()], "float32", bucket_bytes=64)
    results = _run(3, plan, {2: 1})  # rank 2 exits after its first tensor
    what, error = results[0]
    assert what == "failed" and "arrived" not in error, error


def test_the_driver_can_call_off_a_sync_a_member_never_reaches():
    weights = _weights()
    plan = plan_buckets([(k, tuple(v.shape)) for k, v in weights.items()], "float32", bucket_bytes=1024)

    def abandon_open(store: SyncStore) -> None:
        deadline = time.monotonic() + 30
        while store.arrived(0, "open", 3) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        store.abandon(0, "open")

    results = _run(3, plan, {}, join=[0, 1], after=abandon_open)  # rank 2 never starts
    assert results == {0: ("abandoned", None), 1: ("abandoned", None)}
