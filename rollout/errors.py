"""How a command that failed is reported: its exit code (2: fix what you passed; 1: the job failed on
its way) and one line naming what failed and, for an actor, which one."""

from __future__ import annotations

import re
import sys


def exit_code(error: BaseException) -> int | None:
    """2 for what the user must fix in what they passed (files, data, options), 1 for a job that
    failed on its way (disk, actors, timeouts); None for anything else, which is a bug: traceback."""
    from contracts.jsonl import FormatError
    from rollout.archive import ArchiveCorruptError
    from rollout.driver.checkpoints import ResumeError
    from rollout.driver.prompts import DataError
    from rollout.driver.run_lock import RunDirBusy
    from rollout.driver.run_storage import RunStorageError

    raised_in_actor = _actor(error) is not None
    error = _cause(error)
    if isinstance(
        error,
        (
            DataError,
            FormatError,
            RunDirBusy,
            RunStorageError,
            ResumeError,
            ArchiveCorruptError,
            FileNotFoundError,
            IsADirectoryError,
            NotADirectoryError,
            PermissionError,
        ),
    ):
        return 2
    if isinstance(error, OSError):  # a full disk, a read-only or failing device
        return 1
    exceptions = sys.modules.get("ray.exceptions")
    if exceptions and isinstance(error, exceptions.RayActorError):  # an actor gone for good
        return 1
    failures = {
        "LearnerError",
        "GenerationTimeout",
        "WorkerStartError",
        "WeightSyncError",
        "PipelineTimeout",
        "ReplayError",
        "CheckpointWriteError",
        "ArchiveWriteError",
        "NonFiniteError",
    }
    if any(kind.__name__ in failures for kind in type(error).__mro__):
        return 2 if type(error).__name__ == "ReplayError" else 1
    # Raised by an actor's code (the engine refusing a request, a rule's bug): an error of the job,
    # shown with the actor's name and its own message, not retried.
    return 1 if raised_in_actor else None


def _actor(error: BaseException) -> str | None:
    """The name of the actor whose code raised `error` (the actors' __repr__), if one did."""
    exceptions = sys.modules.get("ray.exceptions")
    if not (exceptions and isinstance(error, exceptions.RayTaskError)):
        return None
    # Ray's first line: "ray::_RolloutActor.stream() (pid=.., ip=.., actor_id=.., repr=rollout-0)".
    header = str(error).split("\n", 1)[0]
    method = re.search(r"ray::([\w.]+)\(", header)
    return _repr_name(header) or (method.group(1) if method else "an actor")


def _repr_name(text: str) -> str | None:
    """The actor's own name from Ray's "repr=..." (None where __init__ failed before naming it)."""
    named = re.search(r"repr=([^)]+)\)", text)
    return named.group(1) if named and not named.group(1).startswith(("_", "<")) else None


def _cause(error: BaseException) -> BaseException:
    """An actor's error as raised there, not Ray's wrapper with the remote traceback."""
    exceptions = sys.modules.get("ray.exceptions")  # not imported: no actor ran, nothing to unwrap
    while exceptions and isinstance(error, exceptions.RayTaskError) and getattr(error, "cause", None) is not None:
        error = error.cause
    return error


def one_line(error: BaseException) -> str:
    actor = _actor(error)
    error = _cause(error)
    text = str(error).strip()
    if actor is not None and not isinstance(error, sys.modules["ray.exceptions"].RayError):
        first = text.splitlines()[0] if text else ""
        return f"{actor} raised {type(error).__name__}{': ' + first if first else ''}"
    exceptions = sys.modules.get("ray.exceptions")
    if exceptions and isinstance(error, exceptions.RayActorError):
        actor = re.search(r"class_name: (\w+)", text) or re.search(r"ray::(\w+)\.", text)
        kind = {
            "_RolloutActor": "a rollout worker (rollout",
            "_RewardActor": "a reward worker (reward",
            "_Rank": "a learner rank (learner",
        }.get(actor.group(1) if actor else "", "an actor (")
        if "error raised in its creation task" in text:  # its own start-up failed: say with what
            raised = [line for line in text.splitlines() if re.match(r"^[\w.]+(Error|Exception)\w*: ", line)]
            who = _repr_name(text) or kind.split(" (")[0]
            return (
                f"{who} failed in its start-up: {raised[-1] if raised else text.splitlines()[0]}; its log is "
                "under RUN_DIR/logs"
            )
        return (
            f"{kind}.max_restarts) died and was not restarted: its restarts are spent, or it could not be "
            f"placed again; its log is under RUN_DIR/logs"
        )
    return text.splitlines()[0] if text else type(error).__name__
