"""What the driver asks of an iteration's episodes: that its environment did not fail too many of them."""

from __future__ import annotations

from contracts.config import EnvConfig
from contracts.errors import JobFailure


class EnvironmentFailure(JobFailure):
    """More of an iteration's episodes than `env.max_error_fraction` ended on their environment's error."""


def check_episodes(cfg: EnvConfig, iteration: int, summaries) -> None:
    """EnvironmentFailure naming the environment and its first error when more than `env.max_error_fraction`
    of the iteration's episodes failed in it (each one alone just ends, `finish_reason: env_error`)."""
    errors = sum(s.env_errors for s in summaries)
    samples = sum(s.samples for s in summaries)
    if cfg.name is None or errors <= cfg.max_error_fraction * samples:
        return
    first = next(s.first_env_error for s in summaries if s.first_env_error)
    raise EnvironmentFailure(
        f"{errors} of {samples} episodes of iteration {iteration} failed in environment {cfg.name}, more than "
        f"env.max_error_fraction ({cfg.max_error_fraction:g}); the first: {first}"
    )
