"""`learner.teacher.path` to the model directory the learner loads: a `builtin:` model built, a run directory's
latest whole checkpoint's policy, a checkpoint's policy, else the path as given (a model directory or hub id)."""

from __future__ import annotations

from pathlib import Path

from contracts.builtin_model import BUILTIN_PREFIX, resolve_model_path
from contracts.config import ConfigError, JobConfig
from rollout.driver.checkpoints import CHECKPOINTS

POLICY = "policy"  # a checkpoint's loadable model (learner/checkpoint.py)


def teacher_model_path(cfg: JobConfig) -> str | None:
    """The teacher's model directory, None without a teacher; ConfigError naming the field when `path` is a
    directory that holds no model, or a run with no whole checkpoint."""
    teacher = cfg.learner.teacher
    if teacher is None:
        return None
    path = teacher.path
    if path.startswith(BUILTIN_PREFIX):
        try:
            return resolve_model_path(path)
        except ValueError as e:
            raise ConfigError(f"learner.teacher.path: {e}".replace("model.path: ", "")) from None
    directory = Path(path).expanduser()
    if not directory.exists():
        if path.startswith(("/", ".", "~")):
            raise ConfigError(f"learner.teacher.path: {path} does not exist")
        return path  # a hub id
    if (directory / CHECKPOINTS).is_dir():  # a run: its latest whole checkpoint
        from contracts.errors import UserError
        from rollout.driver.evaluation import checkpoint_of

        try:
            directory, _ = checkpoint_of(run=directory)
        except UserError as e:
            raise ConfigError(f"learner.teacher.path: {e}") from None
    if (directory / POLICY / "config.json").is_file():  # a checkpoint
        return str(directory / POLICY)
    if (directory / "config.json").is_file():
        return str(directory)
    raise ConfigError(
        f"learner.teacher.path: {path} is neither a model directory (config.json), a checkpoint (policy/) nor a "
        f"run directory ({CHECKPOINTS}/)"
    )
