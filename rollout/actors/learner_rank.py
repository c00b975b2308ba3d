"""`LearnerRank`: the Ray edge of one `Learner`, one per rank of the learner's group (`learner_ranks.py`).
Every rank runs each call (FSDP's collectives need them all); only rank 0's answer travels back."""

from __future__ import annotations

import socket
from pathlib import Path

import ray

from contracts import storage
from learner.samples import SampleBatch
from rollout.actors.learner_spec import LearnerSpec
from rollout.actors.member import Member
from rollout.weight_sync.sender import WeightSender
from rollout.weight_sync.wire import GroupAddress, SyncPlan


class LearnerRank(Member):
    kind = "learner"

    def __init__(self, process_env: dict[str, str]):
        super().__init__("learner", process_env)
        self.rank: int | None = None
        self.learning = False
        self.pending = None  # the checkpoint being written in the background

    def address(self) -> str:
        """A free port on this node, for the process group rank 0 serves."""
        with socket.socket() as s:
            s.bind(("", 0))
            return f"{ray.util.get_node_ip_address()}:{s.getsockname()[1]}"

    def start(self, spec: LearnerSpec, rank: int, world_size: int, address: str) -> None:
        self.rank, self.name = rank, f"learner rank {rank}"
        self.build(lambda: spec.build(rank=rank, world_size=world_size, address=address))
        self.sender = WeightSender(self.core)

    def progress(self) -> int | None:
        """Micro-batches done while learning; None in the other calls, which are single library calls (a
        checkpoint, a gather) whose answer is progress enough."""
        return self.core.micro_batches_done if self.learning else None

    # Every rank runs each call below (FSDP's collectives need them all); only rank 0's answer travels back.

    def learn(self, batches: list[ray.ObjectRef], rewards: list[ray.ObjectRef], timeout: float, selected=None):
        """One iteration on the generation and reward batches (fetched here; `selected`: per batch, the rows the
        update uses): (per-token columns, for the archive; (stats, stage seconds), for the driver)."""
        from rollout.archive.columns import sample_batch

        return self.learn_samples(
            sample_batch(ray.get(batches, timeout=timeout), ray.get(rewards, timeout=timeout), selected)
        )

    def learn_samples(self, samples: SampleBatch):
        """`learn` on a batch already assembled (an archive's samples, a test's)."""
        self.learning = True
        try:
            columns, stats, timings = self.core.learn(samples)
        finally:
            self.learning = False
        return self._answer(columns), (stats, timings)

    def save(self, directory: Path, extra: dict) -> None:
        """Stage this rank's part of checkpoint `directory`; it is written in the background (`written`)."""
        Path(directory).mkdir(parents=True, exist_ok=True)  # on a node that does not see the driver's disk, too
        self.pending = self.core.save_async(directory, extra)

    def written(self, wait: bool) -> float | None:
        """The seconds the pending checkpoint took to write, once it is written (and published, for a
        driver that cannot see this node's disk); None while it is still writing and not `wait`."""
        pending = self.pending
        if pending is None or not (wait or pending.done()):
            return None if pending is not None else 0.0
        seconds = pending.wait()
        storage.publish(pending.directory)
        self.pending = None
        return seconds

    def load(self, directory: Path) -> dict:
        return self._answer(self.core.load(storage.fetch(directory)))

    def probe_logprobs(self, token_ids: list[int]) -> list[float]:
        return self._answer(self.core.probe_logprobs(token_ids))

    def export_weights(self):
        """(weights, True): the flag is small, so a caller can wait on it and leave the weights in the store."""
        return self._answer(self.core.export_weights()), True

    def versioned_weights(self):
        return self._answer(self.core.versioned_weights()), True

    def weight_plan(self, dtype: str, bucket_bytes: int) -> SyncPlan:
        return self._answer(self.sender.plan(dtype, bucket_bytes))

    def open_weight_group(self, address: GroupAddress) -> bool:
        return self.sender.open(address)

    def broadcast_weights(self, plan: SyncPlan, sync: int) -> bool:
        return self.sender.broadcast(plan, sync)

    def version(self) -> int:  # rank 0 alone: no collective
        return self.core.version

    def _answer(self, result):
        return result if self.rank == 0 else None
