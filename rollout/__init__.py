"""The PPO rollout service. `import rollout` is light (no torch, Ray or vLLM): the Python API
(`rollout.api`: `load_config`, `run`, `generate`, `evaluate`, `replay`, `open_run`, `Run`) is imported on first use;
the command line is `rollout.cli.main`."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rollout.api import Run, evaluate, generate, load_config, open_run, replay, run

__all__ = ["Run", "evaluate", "generate", "load_config", "open_run", "replay", "run"]


def __getattr__(name: str):
    if name in __all__:
        from rollout import api

        return getattr(api, name)
    raise AttributeError(f"module 'rollout' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
