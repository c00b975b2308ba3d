"""What an environment is: the contract every multi-turn rollout plays against (`env.name` in the config).

An episode is a conversation between the model and one `Environment` instance, made for that episode
alone with the config's `env.params` as keyword arguments:

    env = Environment(**params)
    prompt = render(env.opening(record)) # the messages the first turn answers (a classmethod)
    extra = env.reset(record)            # text added to the prompt as a user turn, or None
    while True:
        text = <the model's next turn>
        result = env.step(text)          # StepResult(observation, reward, done, info)
        if result.done: break
        <result.observation is the next user (or tool) turn, rendered by the model's chat template>

`record` is the data record the prompt came from (`contracts.formats.PromptRecord`: its messages,
reference and metadata). A reward in a `StepResult` lands on the model turn it answers; the episode's
own reward (the rules, a reward model) lands on its last turn. An environment never runs what the model
wrote as code: it parses it. Built-in environments are registered by name in `rollout/environments/`; a
user's own class is named `package.module:ClassName` and must be importable on every node.
"""

from __future__ import annotations

from typing import Any

import msgspec

from contracts.formats import Message


class StepResult(msgspec.Struct, kw_only=True):
    """The environment's answer to one model turn."""

    observation: str | None = None  # the next user or tool turn; None with `done`
    reward: float | None = None  # this turn's reward, if the environment gives one
    done: bool = False  # the episode is over: no observation follows
    info: dict[str, Any] = msgspec.field(default_factory=dict)  # anything to keep (archived per episode)


class Environment:
    """The base of every environment. Subclasses take their `env.params` as keyword arguments, and
    override `step` (and `reset` where the episode needs more than the prompt)."""

    def __init__(self, **params: Any):
        if params:
            raise TypeError(f"{type(self).__name__} takes no params, got {', '.join(sorted(params))}")

    @classmethod
    def opening(cls, record: Any) -> list[Message]:
        """The messages the episode's prompt is rendered from (its first turn answers them); by default
        the whole record's `messages`. An environment that plays the record's later turns itself
        (`conversation`) opens with fewer. Called on the class, before any instance exists: the
        prompt-length check at start-up renders it too."""
        return list(record.messages)

    def reset(self, record: Any) -> str | None:
        """Start the episode of `record`; text to add to the prompt as a user turn, or None to leave it."""
        return None

    def step(self, text: str) -> StepResult:
        """The model wrote `text` (its turn, decoded): what happens next."""
        raise NotImplementedError(f"{type(self).__name__}.step")
