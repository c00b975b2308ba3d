"""The learner ranks as Ray actors: one placement group, one process group, every call to every rank.

Each rank is a `Learner` (plain class, `learner/`) inside a thin actor. The actors are created
empty so that rank 0 can name the process group's address before any rank joins it; then all of
them build their `Learner` at once. Calls go to every rank (FSDP's collectives need them all) and
rank 0's answer is the group's. Every wait has a timeout that names the rank it waited on.
"""

from __future__ import annotations

import socket
import sys
import time

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from learner.device import resolve_device
from rollout.config import JobConfig
from rollout.console import actor_options, route_actor_output
from rollout.stall import CONCURRENCY_GROUPS, POLL_S, Patience, StallWatch, stalled_message


class LearnerError(RuntimeError):
    """A learner rank could not be placed, failed or did not answer in time; the message names it."""


class _Rank:
    def __init__(self):
        route_actor_output()
        self.rank = None
        self.learning = False

    def __repr__(self) -> str:  # Ray names the actor by it in its errors and log lines
        return "learner" if self.rank is None else f"learner rank {self.rank}"

    def address(self) -> str:
        """A free port on this node, for the process group rank 0 serves."""
        with socket.socket() as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        return f"{ray.util.get_node_ip_address()}:{port}"

    def start(self, cfg: JobConfig, model_path: str, rank: int, world_size: int, address: str) -> None:
        from learner.learner import Learner

        self.rank = rank
        self.learner = Learner(cfg, model_path, rank=rank, world_size=world_size, address=address)

    def progress(self) -> int | None:
        """Micro-batches done while learning (rollout.stall); None in the other calls, which are single
        library calls (a checkpoint, a gather) whose answer is progress enough."""
        return self.learner.micro_batches_done if self.learning else None

    def call(self, method: str, *args):
        """Every rank computes the same answer; only rank 0's travels back."""
        result = getattr(self.learner, method)(*args)
        return result if self.rank == 0 else None

    def call_checked(self, method: str, *args):
        """`call`, with a second, small return that says it finished: read without fetching the first."""
        return self.call(method, *args), True

    def learn(self, batches: list[ray.ObjectRef], rewards: list[ray.ObjectRef], timeout: float):
        """One iteration on the generation and reward batches (fetched here, from the object store):
        (per-token columns, for the archive; (stats, stage seconds), for the driver)."""
        from rollout.columns import sample_batch

        samples = sample_batch(ray.get(batches, timeout=timeout), ray.get(rewards, timeout=timeout))
        self.learning = True
        try:
            columns, stats, timings = self.learner.learn(samples)
        finally:
            self.learning = False
        return (columns if self.rank == 0 else None), (stats, timings)


class LearnerGroup:
    def __init__(self, cfg: JobConfig, model_path: str):
        lc = cfg.learner
        place_timeout_s = cfg.ray.actor_start_timeout_s
        self.timeout = lc.call_timeout_s
        gpus = 1 if resolve_device(lc.device) == "cuda" else 0
        bundle = {"CPU": lc.num_cpus_per_rank, **({"GPU": gpus} if gpus else {})}
        self.group = placement_group([bundle] * lc.num_ranks, strategy="PACK")
        ready, _ = ray.wait([self.group.ready()], timeout=place_timeout_s)
        if not ready:
            remove_placement_group(self.group)
            raise LearnerError(
                f"the learner's {lc.num_ranks} rank(s) x {bundle} could not be placed within "
                f"ray.actor_start_timeout_s ({place_timeout_s:.0f}s); the cluster has {ray.available_resources()} free: lower "
                "learner.num_ranks or learner.num_cpus_per_rank, or add nodes")
        actor = ray.remote(concurrency_groups=CONCURRENCY_GROUPS)(_Rank)
        self.watch = StallWatch(lc.stall_timeout_s)
        self.ranks = [actor.options(num_cpus=lc.num_cpus_per_rank, num_gpus=gpus, **actor_options(f"learner-{i}"),
                                    scheduling_strategy=PlacementGroupSchedulingStrategy(self.group, i)).remote()
                      for i in range(lc.num_ranks)]
        address = self._get(self.ranks[0].address.remote(), "learner rank 0")
        self._finish([r.start.remote(cfg, model_path, i, lc.num_ranks, address) for i, r in enumerate(self.ranks)])

    def submit(self, method: str, *args) -> list[ray.ObjectRef]:
        """Start `method` on every rank; the refs, rank order."""
        return [r.call.remote(method, *args) for r in self.ranks]

    def call(self, method: str, *args):
        """`method` on every rank; rank 0's result once all have finished."""
        refs = self._finish(self.submit(method, *args))
        return self._get(refs[0], "learner rank 0")

    def learn(self, batches: list[ray.ObjectRef], rewards: list[ray.ObjectRef]
              ) -> tuple[ray.ObjectRef, dict[str, float], dict[str, float]]:
        """An iteration's learning: (ref to rank 0's LearnerColumns, stats, stage seconds)."""
        pairs = [r.learn.options(num_returns=2).remote(batches, rewards, self.timeout) for r in self.ranks]
        summaries = self._finish([summary for _, summary in pairs])
        stats, timings = self._get(summaries[0], "learner rank 0")
        return pairs[0][0], stats, timings

    def call_ref(self, method: str, *args) -> ray.ObjectRef:
        """Like `call`, but rank 0's result stays in the object store (weights go to workers from there).
        Every rank's finish flag is read, so a rank that died raises here, not in whoever reads the result."""
        pairs = [r.call_checked.options(num_returns=2).remote(method, *args) for r in self.ranks]
        flags = self._finish([flag for _, flag in pairs])
        self._get(flags[0], "learner rank 0")
        return pairs[0][0]

    def rank0(self, method: str, *args):
        """A call that involves no collective, on rank 0 alone."""
        ref = self.ranks[0].call.remote(method, *args)
        self._finish([ref])  # watched, as every wait on a rank is
        return self._get(ref, "learner rank 0")

    def names(self) -> list[str]:
        return [f"learner rank {i}" for i in range(len(self.ranks))]

    def _finish(self, refs: list[ray.ObjectRef]) -> list[ray.ObjectRef]:
        """Wait for every rank, raising as soon as one fails: the others may be blocked in a collective
        with it, and would only give up at the timeout. The other ranks' answers are None."""
        names = dict(zip(refs, self.names()))
        pending, deadline = list(refs), time.monotonic() + self.timeout
        patience = Patience()
        while pending:
            done, pending = ray.wait(pending, num_returns=1, timeout=max(0.0, min(POLL_S, deadline - time.monotonic())))
            if not done:
                if time.monotonic() >= deadline:
                    late = ", ".join(names[r] for r in pending)
                    raise LearnerError(f"{late} did not finish within learner.call_timeout_s ({self.timeout:.0f}s)")
                self._kill_stalled({names[r] for r in pending})
                patience.note(lambda: ", ".join(names[r] for r in pending))
                continue
            if done[0] is not refs[0]:
                self._get(done[0], names[done[0]])
        return refs

    def _kill_stalled(self, busy: set[str]) -> None:
        """A rank that makes no progress is killed: its call then fails as a death does, and the
        driver rebuilds the group from the newest checkpoint."""
        ranks = dict(zip(self.names(), self.ranks))
        for name in self.watch.stalled({name: ranks[name] for name in busy}):
            print(stalled_message(name, self.watch.timeout_s, "learner.stall_timeout_s",
                                  "killing it; the learner is rebuilt from the newest checkpoint"),
                  file=sys.stderr, flush=True)
            ray.kill(ranks[name])

    def _get(self, ref: ray.ObjectRef, name: str):
        try:
            return ray.get(ref, timeout=self.timeout)
        except ray.exceptions.GetTimeoutError:
            raise LearnerError(f"{name} did not answer within learner.call_timeout_s ({self.timeout:.0f}s)") from None

    def shutdown(self) -> None:
        for r in self.ranks:
            ray.kill(r)
        remove_placement_group(self.group)
