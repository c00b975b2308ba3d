"""Checkpoints written in the background: the learner stops only while its states are staged.

`Learner.save_async(directory, extra)`, on every rank, checks the weights finite (`NonFiniteError`: such
weights are never saved), then `CheckpointWriter.save_async`:
1. the previous checkpoint's write is waited for (one write at a time);
2. staged, while the caller waits: the sharded training state copied into CPU memory that is kept from
   one checkpoint to the next (pinned on cuda, so the copy runs at the bus's speed: DCP's
   `DefaultStager`), and, on rank 0, the policy exported once in the engines' dtype;
3. written by threads while the learner goes on: DCP's shards (their collectives on a process group of
   their own, `learner.distributed.checkpoint_group`, so they never interleave with FSDP's), then rank
   0's `policy/` and, last, `learner.pt`.
The returned `PendingCheckpoint` says when the write is done, and how long it took. A checkpoint is
whole only once `learner.pt` is there and the driver has listed every file in its manifest, so a crash
during a write leaves the previous checkpoint the newest whole one.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

from learner import checkpoint
from learner.checkpoint import STATE_FILE

if TYPE_CHECKING:
    from learner.models import Trained

# DCP warns from its upload thread that one process is "assumed" even when told so (no_dist): one rank
# is the intent, and a filter set around the call would not reach that thread.
warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)


class PendingCheckpoint:
    """A checkpoint being written: `done()`, and `wait()` for the write's seconds (or its error)."""

    def __init__(self, directory: Path, staged_s: float, write: Future):
        self.directory, self.staged_s, self._write = directory, staged_s, write

    def done(self) -> bool:
        return self._write.done()

    def wait(self) -> float:
        """The seconds the write took once staged; CheckpointWriteError naming the checkpoint if it failed."""
        try:
            return self._write.result()
        except Exception as e:  # noqa: BLE001 - every failure of the write is this checkpoint's
            raise checkpoint.write_failed(self.directory, e) from None


class CheckpointWriter:
    """One rank's checkpoint writes, one at a time; `group` is the process group of DCP's collectives (None:
    one rank), and on `cuda` the staging memory is pinned."""

    def __init__(self, rank: int, world_size: int, group, *, cuda: bool):
        self.rank, self.world_size, self.group, self.cuda = rank, world_size, group, cuda
        self._stager = None  # made at the first checkpoint; holds the staging memory from then on
        self._threads = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint-writer")
        self.pending: PendingCheckpoint | None = None

    def save_async(
        self,
        directory: Path,
        trained: list[Trained],
        state_file: dict,
        export: Callable[[], list[tuple[str, object]] | None],
        lm,
        tied_head: bool,
    ) -> PendingCheckpoint:
        """Stage the `trained` networks' training state and `export()`'s weights (the policy, rank 0's; a
        collective when sharded), then write them, with `state_file` (rank 0's `learner.pt`) last, in the
        background; `lm` and `tied_head` make the weights a loadable model (`checkpoint.save_policy`)."""
        import torch
        import torch.distributed.checkpoint as dcp

        directory = Path(directory)
        if self.pending is not None:
            self.pending.wait()
        start = time.perf_counter()
        try:
            with checkpoint.single_process_note_quiet():
                shards = dcp.async_save(
                    checkpoint.training_state(trained),
                    checkpoint_id=str(directory / "learner"),
                    process_group=self.group,
                    async_stager=self._staging(),
                    no_dist=self.world_size == 1,
                )
            weights = export()
        except (OSError, RuntimeError) as e:
            raise checkpoint.write_failed(directory, e) from None
        staged = time.perf_counter()

        def write() -> float:
            _result(shards)
            if self.rank == 0:
                checkpoint.save_policy(lm, tied_head, directory / "policy", weights)
                torch.save(state_file, directory / STATE_FILE)  # last: it marks the checkpoint written
            return time.perf_counter() - staged  # the write alone: what ran beside the learner

        self.pending = PendingCheckpoint(directory, staged - start, self._threads.submit(write))
        return self.pending

    def _staging(self):
        """DCP's stager, synchronous (the caller waits for the copy) and kept, so its memory is reused."""
        if self._stager is None:
            from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

            self._stager = DefaultStager(
                StagingOptions(
                    use_pinned_memory=self.cuda,
                    use_shared_memory=False,
                    use_async_staging=False,
                    use_non_blocking_copy=self.cuda,
                )
            )
        return self._stager


def _result(shards) -> None:
    """Wait for DCP's upload, a Future (or, in newer torch, a response holding one)."""
    future = getattr(shards, "upload_completion", shards)
    future.result()
