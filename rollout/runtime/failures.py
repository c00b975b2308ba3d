"""The job failures of actors, raised where a group waits on its members, each naming the member.

Ray reports an actor's own error as a `RayTaskError` whose `cause` is the exception its code raised;
the groups unwrap it by type here (`raised`) into `ActorRaised`, which names the member, so nothing
downstream reads Ray's text to find out who raised what.
"""

from __future__ import annotations

from contracts.errors import JobFailure, first_line


class ActorRaised(JobFailure):
    """A member's own code raised `cause`: an error of the job, the same on any member, so it is shown
    once and not retried. The command's exit code follows the cause (2 for a `UserError`)."""

    def __init__(self, member: str, cause: BaseException):
        text = str(cause).strip()
        super().__init__(f"{member} raised {type(cause).__name__}{': ' + text.splitlines()[0] if text else ''}")
        self.member, self.cause = member, cause


def raised(member: str, error: BaseException) -> ActorRaised:
    """`error` (a RayTaskError from `member`, or what its code raised) as ActorRaised naming the member."""
    return ActorRaised(member, getattr(error, "cause", None) or error)


class ActorStartError(JobFailure):
    """A member could not be placed, did not start, failed in its start-up, or died and did not come
    back; the message names it and what it asked for."""


def start_failed(member: str, cause: BaseException) -> ActorStartError:
    """`member`'s object failed to build, raising `cause`."""
    return ActorStartError(
        f"{member} failed in its start-up: {type(cause).__name__}: {first_line(cause)}; its log is under RUN_DIR/logs"
    )


class PipelineTimeout(JobFailure):
    """Generation or scoring of an iteration did not finish in time; the message says which."""
