"""RUN_DIR/checkpoints as the driver keeps it: where the learner saves, the one write in flight, its commit,
and where the learner restarts from.

    checkpoints/iter-000009.partial/   being written (a crash leaves it; the next save removes it)
    checkpoints/iter-000009/           whole: renamed once its manifest lists every file
    checkpoints/latest                 the newest whole one's name, written last

A checkpoint is staged while the job loop waits, then written by the learner's ranks in the background,
one write at a time; it is committed (its files pulled from the run's URI, its tokenizer, its manifest, its
final name, `latest`, the run manifest's entry, the push) once the learner says the write is done. A rank lost
meanwhile asks `restart_point` what the new ranks load: the write in flight is committed first if it finished,
else removed.

A resume takes `latest` if it verifies against its manifest, else the newest one that does, saying in
one line per broken checkpoint what is wrong with it; it never falls back to the start model while a
whole checkpoint exists. `rollout run --resume-from PATH` and `--no-resume` override the choice.
"""

from __future__ import annotations

import os
import shutil
import threading
from pathlib import Path

from contracts.errors import UserError
from contracts.files import write_atomically
from learner import checkpoint
from learner.checkpoint import STATE_FILE, CheckpointWriteError
from rollout.archive.manifest import RunManifest
from rollout.driver.run_storage import RunStorage

CHECKPOINTS = "checkpoints"
LATEST = "latest"
AUTO = "auto"  # resume from the newest whole checkpoint in the run directory, if there is one
NEVER = "never"  # start from the start model whatever the run directory holds


class ResumeError(UserError, ValueError):
    """The checkpoint an operator asked to resume from is missing or not whole."""


class Checkpoints:
    def __init__(
        self,
        run_dir: Path,
        keep_last: int | None,
        *,
        manifest: RunManifest | None = None,
        storage: RunStorage | None = None,
        tokenizer=None,
    ):
        """`manifest`: the run's, told of each commit; `storage`: the run's URI, pushed each commit; `tokenizer`:
        saved into each checkpoint's policy/, so that engines can load it."""
        self.run_dir = Path(run_dir)
        self.root = self.run_dir / CHECKPOINTS
        self.keep_last = keep_last
        self.manifest, self.storage, self.tokenizer = manifest, storage, tokenizer
        self._restart_from: Path | None = None  # the newest whole checkpoint this run resumed from or committed
        self._writing: tuple[int, Path] | None = None  # the checkpoint being written: (iteration, partial)
        self._written_s: float | None = None  # how long the last one committed took to write, until reported
        self._lock = threading.Lock()  # a rank lost on a collector thread settles the write there

    def partial(self, iteration: int) -> Path:
        """Where the learner writes iteration's checkpoint; emptied of any save a crash cut short."""
        path = self.root / f"iter-{iteration:06d}.partial"
        shutil.rmtree(path, ignore_errors=True)
        return path

    def commit(self, partial: Path) -> Path:
        """A finished save made whole: its manifest, its final name, `latest`, then old ones pruned."""
        checkpoint.write_manifest(partial)
        directory = partial.with_suffix("")
        if directory.exists():
            shutil.rmtree(directory)
        os.replace(partial, directory)
        write_atomically(self.root / LATEST, directory.name)
        if self.keep_last is not None:
            for old in self._whole_or_not()[self.keep_last :]:
                shutil.rmtree(old, ignore_errors=True)
        return directory

    def resume_point(self, choice: str | Path, log) -> Path | None:
        """The checkpoint to start from (and to restart the learner from, until one is committed): `choice` is
        AUTO, NEVER or a checkpoint directory."""
        self._restart_from = self._chosen(choice, log)
        return self._restart_from

    def _chosen(self, choice: str | Path, log) -> Path | None:
        if choice == NEVER:
            return None
        if choice != AUTO:
            problem = checkpoint.problem(Path(choice))
            if problem is not None:
                raise ResumeError(f"--resume-from {choice}: not a whole checkpoint ({problem})")
            return Path(choice)
        named = self._named_latest()
        candidates = ([self.root / named] if named else []) + [p for p in self._whole_or_not() if p.name != named]
        broken = []
        for directory in candidates:
            problem = checkpoint.problem(directory)
            if problem is None:
                for name, why in broken:
                    print(f"checkpoint {name} is broken ({why}): resuming from {directory.name}", file=log, flush=True)
                return directory
            broken.append((directory.name, problem))
        for name, why in broken:
            print(
                f"checkpoint {name} is broken ({why}) and no whole one is left: starting from the start model",
                file=log,
                flush=True,
            )
        return None

    # -- the write in flight ---------------------------------------------------------------------

    def save(self, iteration: int, extra: dict, learner) -> None:
        """Stage the learner's checkpoint of `iteration`, which its ranks then write in the background: the
        loop waits only for the write before this one and the staging copy. Committed by `commit_written`."""
        self.commit_written(learner, wait=True)  # one write at a time
        partial = self.partial(iteration)
        self._writing = (iteration, partial)  # before the call: a rank lost in it is settled from this
        learner.save(partial, {**extra, "iteration": iteration})

    def commit_written(self, learner, *, wait: bool) -> None:
        """Commit the checkpoint being written once the learner says its write is done (with `wait`, once it
        is). A rank lost in the wait settled it already (`restart_point`)."""
        if self._writing is None:
            return
        seconds = learner.written(wait)
        with self._lock:
            if seconds is not None and self._writing is not None:
                self._commit(seconds)

    def write_seconds(self) -> float | None:
        """How long the checkpoint committed last took to write, said once (None: none committed since, or
        one settled after a lost rank)."""
        seconds, self._written_s = self._written_s, None
        return seconds

    def restart_point(self) -> Path | None:
        """What rebuilt learner ranks load (None: the start model), asked as a rank is lost. The checkpoint it
        was writing is committed first if its write finished (rank 0 writes `learner.pt` last, once every
        rank's shards are in), so the new ranks start from it; otherwise it is removed, and the one before
        stays `latest`."""
        with self._lock:
            if self._writing is not None:
                _, partial = self._writing
                if (partial / STATE_FILE).is_file():
                    self._commit(None)
                else:
                    shutil.rmtree(partial, ignore_errors=True)
                    self._writing = None
            return self._restart_from

    def _commit(self, seconds: float | None) -> None:
        iteration, partial = self._writing
        self._writing = None
        if self.storage:  # ranks on nodes that cannot see this disk published their parts to the URI
            self.storage.pull_tree(partial.relative_to(self.run_dir).as_posix())
        if not (partial / STATE_FILE).is_file():  # rank 0 saved on a disk this process does not see
            raise CheckpointWriteError(
                f"the learner saved checkpoint {partial.name} where the driver cannot see it ({partial} is not "
                "on this node's disk): put --out on storage every node mounts, or in an object store "
                "(--out s3://bucket/run), through which the ranks publish what they write"
            )
        self.tokenizer.save_pretrained(partial / "policy")  # the policy directory is a complete model: engines load it
        committed = self.commit(partial)
        self.manifest.checkpoint(iteration, committed.name)
        if self.storage:
            self.storage.push_checkpoint(committed)
        self._restart_from, self._written_s = committed, seconds

    # -- the directory -----------------------------------------------------------------------------

    def _named_latest(self) -> str | None:
        pointer = self.root / LATEST
        return pointer.read_text().strip() or None if pointer.exists() else None

    def _whole_or_not(self) -> list[Path]:
        """Every committed checkpoint directory, newest first."""
        return sorted((p for p in self.root.glob("iter-*") if p.is_dir() and p.suffix != ".partial"), reverse=True)
