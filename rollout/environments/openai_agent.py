"""`openai_agent`: an agent written against the OpenAI API, trained unchanged.

Nothing here is stepped: each episode runs the user's agent function against an OpenAI-compatible
endpoint on the rollout worker (`rollout.generation.agents`), which records every call token by token.
This class is the environment's face to the registry and the start-up check: its params are read and
the agent function imported here, so a bad `env.params.agent` fails in seconds, before Ray starts.

Params: `agent` (`package.module:function`, required), `episode_timeout_s` (default 300: the whole
episode, time waiting on the engine included), `reward_to` (`all_segments` or `last_segment`),
`tool_parser` (the registry name of how tool calls are read back from the model's text; `hermes`);
any other param is passed on to the agent function as a keyword argument.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from typing import Any

from contracts.config import ConfigError
from contracts.config.env import REWARD_TO
from contracts.environment import Environment, StepResult
from contracts.registry import import_entry
from rollout.environments.registry import ENVIRONMENTS

DEFAULT_EPISODE_TIMEOUT_S = 300.0


@ENVIRONMENTS.register("openai_agent", serves_agents=True)
class OpenAIAgent(Environment):
    """The params of an agent's episodes; the rollout worker runs them (`rollout.generation.agents`)."""

    serves_agents = True  # the rollout worker runs these episodes through its endpoint, not step()

    def __init__(
        self,
        agent: str | None = None,
        episode_timeout_s: float = DEFAULT_EPISODE_TIMEOUT_S,
        reward_to: str = REWARD_TO[0],
        tool_parser: str = "hermes",
        **agent_params: Any,
    ):
        if not isinstance(agent, str) or ":" not in agent:
            raise ValueError(f"openai_agent: agent must name your function as package.module:function, got {agent!r}")
        if isinstance(episode_timeout_s, bool) or not isinstance(episode_timeout_s, (int, float)):
            raise ValueError(f"openai_agent: episode_timeout_s must be a number of seconds, got {episode_timeout_s!r}")
        if not (math.isfinite(episode_timeout_s) and episode_timeout_s > 0):
            raise ValueError(f"openai_agent: episode_timeout_s must be > 0, got {episode_timeout_s!r}")
        if reward_to not in REWARD_TO:
            raise ValueError(f"env.params.reward_to must be one of {', '.join(REWARD_TO)}, got {reward_to!r}")
        from rollout.environments.tool_calls import TOOL_PARSERS

        self.parse_tool_calls = TOOL_PARSERS.lookup(tool_parser, field="env.params.tool_parser")
        self.agent_name = agent
        self.function = load_agent(agent)
        self.episode_timeout_s = float(episode_timeout_s)
        self.reward_to = reward_to
        self.agent_params = agent_params

    def step(self, text: str) -> StepResult:
        raise RuntimeError("openai_agent episodes run through the rollout worker's endpoint, not step()")


def load_agent(name: str) -> Callable[..., Any]:
    """The function `package.module:function` names; ValueError when it is not a function taking the
    client (or `base_url`) and the record."""
    try:
        function = import_entry(name, "env.params.agent", "package.module:function")
    except ConfigError as e:
        raise ValueError(str(e).removeprefix("env.params.agent: ")) from None
    if not callable(function):
        raise ValueError(f"openai_agent: {name} is not callable but {type(function).__name__}")
    try:
        parameters = inspect.signature(function).parameters
    except (TypeError, ValueError):
        return function
    positional = [p for p in parameters.values() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(positional) < 2 and not any(p.kind == p.VAR_POSITIONAL for p in parameters.values()):
        raise ValueError(f"openai_agent: {name} must take (client, record): the episode's client and its record")
    return function


def takes_base_url(function: Callable[..., Any]) -> bool:
    """Whether the agent asks for its episode's URL (a parameter named `base_url`) instead of a client."""
    try:
        return "base_url" in inspect.signature(function).parameters
    except (TypeError, ValueError):
        return False
