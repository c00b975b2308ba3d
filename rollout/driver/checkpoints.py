"""RUN_DIR/checkpoints as the driver keeps it: commit what the learner saved, choose what to resume.

    checkpoints/iter-000009.partial/   being written (a crash leaves it; the next save removes it)
    checkpoints/iter-000009/           whole: renamed once its manifest lists every file
    checkpoints/latest                 the newest whole one's name, written last

A resume takes `latest` if it verifies against its manifest, else the newest one that does, saying in
one line per broken checkpoint what is wrong with it; it never falls back to the start model while a
whole checkpoint exists. `rollout run --resume-from PATH` and `--no-resume` override the choice.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from contracts.errors import UserError
from contracts.files import write_atomically
from learner import checkpoint

CHECKPOINTS = "checkpoints"
LATEST = "latest"
AUTO = "auto"  # resume from the newest whole checkpoint in the run directory, if there is one
NEVER = "never"  # start from the start model whatever the run directory holds


class ResumeError(UserError, ValueError):
    """The checkpoint an operator asked to resume from is missing or not whole."""


class Checkpoints:
    def __init__(self, run_dir: Path, keep_last: int | None):
        self.root = Path(run_dir) / CHECKPOINTS
        self.keep_last = keep_last

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
        """The checkpoint to start from: `choice` is AUTO, NEVER or a checkpoint directory."""
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

    def _named_latest(self) -> str | None:
        pointer = self.root / LATEST
        return pointer.read_text().strip() or None if pointer.exists() else None

    def _whole_or_not(self) -> list[Path]:
        """Every committed checkpoint directory, newest first."""
        return sorted((p for p in self.root.glob("iter-*") if p.is_dir() and p.suffix != ".partial"), reverse=True)
