"""`env`: multi-turn episodes against an environment (`contracts.environment`); null name = single turn."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from msgspec import field

from contracts.config.base import Base, doc

# `openai_agent`'s `env.params.reward_to`: which of an episode's segments take its reward (the first: the default).
REWARD_TO = ("all_segments", "last_segment")


class EnvConfig(Base):
    name: Annotated[
        str | None,
        doc(
            "The environment each rollout is an episode against: a built-in (see Registered) or your own "
            "class as package.module:ClassName (a subclass of contracts.environment.Environment, "
            "importable on every node). null: single-turn rollouts, one completion per prompt."
        ),
    ] = None
    params: Annotated[
        dict[str, Any],
        doc("Keyword arguments of the environment's constructor; one instance is made per episode."),
    ] = field(default_factory=dict)
    max_turns: Annotated[int, doc("Model turns per episode, at most; the episode ends after the last one.", ge=1)] = 4
    max_episode_tokens: Annotated[
        int,
        doc(
            "Tokens after the prompt, the model's and the environment's together; an episode reaching it ends "
            "with finish_reason `length`. model.max_prompt_tokens + this must fit rollout.max_model_len.",
            ge=1,
        ),
    ] = 256
    step_timeout_s: Annotated[
        float, doc("Longest one environment step may take; a slower step fails its episode.", gt=0)
    ] = 10.0
    max_error_fraction: Annotated[
        float,
        doc(
            "Fraction of an iteration's episodes that may fail (their environment raised, or a step ran past "
            "step_timeout_s) before the job fails.",
            ge=0.0,
            le=1.0,
        ),
    ] = 0.5
    num_threads: Annotated[
        int,
        doc(
            "Threads each rollout worker runs environment steps on, off the engine's loop, made as steps "
            "wait for one. Steps that wait (a tool, a remote grader) overlap across threads: with 256 "
            "episodes whose steps sleep 20 ms, the engine sat idle 0.06-0.10 s of a 1.2 s run waiting on "
            "them with 32 threads and 0.02 s with 256, one per sequence of the CPU engine's batch "
            "(benchmarks/multiturn.py).",
            ge=1,
        ),
    ] = 256
    num_processes: Annotated[
        int,
        doc(
            "0: environments run in the rollout worker's own process, their steps on its threads. N: in N "
            "processes of their own per worker, each stepping its environments on its share of num_threads "
            "(the worker's threads then only wait), for environments whose steps compute in Python: in the "
            "worker's process that work holds the interpreter lock the engine's loop needs. With 5 ms of "
            "Python per step on this 2-core machine, the engine's busy fraction went from 0.53-0.58 to 0.87 "
            "with 2 processes, and tokens per second 1.4x (benchmarks/multiturn.py --busy); steps that wait "
            "(a tool, a remote grader) lose to the inter-process calls, 0.49 vs 0.60 of single completions' "
            "speed. A step past step_timeout_s stops its process, and the episodes it held fail (env_error).",
            ge=0,
        ),
    ] = 0
    observation_role: Annotated[
        Literal["user", "tool"],
        doc(
            "The chat role an environment's observation is rendered as; the model's chat template must know "
            "it (the built-in tiny models know user only)."
        ),
    ] = "user"
