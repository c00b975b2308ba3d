"""Single completions: every batch's prompts through the engine's request loop, a window at a time.

At most `engine.window` sequences are in the engine at once, and it is topped up as they finish, so it
schedules across batch boundaries and never drains, while its memory stays that of a window whatever the
batches hold. Each request carries its batch's seed, so what it samples does not depend on which window
it was fed in.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator

import msgspec

from contracts.config import SamplingConfig
from rollout.generation.engine import SampleOutput, VLLMEngine


class Completion(msgspec.Struct):
    """One sample: a completion, or an episode of several model turns with an environment's between them
    (then `mask` says which tokens are the model's, 1, and which the environment's, 0; `logprobs` are 0
    at the environment's)."""

    token_ids: list[int]
    logprobs: list[float]
    text: str
    finish_reason: str
    mask: list[int] | None = None  # None: every token is the model's
    num_turns: int = 1
    final_text: str | None = None  # the model's last turn; None: `text`
    turn_reward_at: list[int] = msgspec.field(default_factory=list)  # token index of a rewarded turn's end
    turn_rewards: list[float] = msgspec.field(default_factory=list)
    env_error: str | None = None  # the first line of the environment's error, if it ended the episode
    prompt_ids: list[int] | None = None  # the episode's own prompt, where `reset` added a turn; None: the task's
    prompt: str | None = None
    policy_version: int | None = None  # of the first token, where it differs from the worker's now; None: the same
    resumed_at: list[int] = msgspec.field(default_factory=list)  # response token each resume began at
    resumed_versions: list[int] = msgspec.field(default_factory=list)  # the weights' version from each resume on
    episode_id: str | None = None  # an agent's episode that is several rows; None: not one
    segment: int = 0
    # An agent's episode (`openai_agent`): the reward its function returned (component `agent`), whether
    # this row takes the episode's reward (`env.params.reward_to`), and its segments before this one.
    agent_reward: float | None = None
    takes_reward: bool = True
    earlier_segments: list[Completion] = msgspec.field(default_factory=list)


def stream_completions(
    engine: VLLMEngine, batches: list[tuple[list[list[int]], int | None]], sampling: SamplingConfig, n: int
) -> Iterator[tuple[int, list[list[Completion]]]]:
    """Every batch's prompts (each batch with its seed), in order; yields (batch index, n completions per
    prompt in prompt order) as each batch completes."""
    waiting = deque((b, i) for b, (prompts, _) in enumerate(batches) for i in range(len(prompts)))
    params = [engine.sampling_params(sampling, n, seed) for _, seed in batches]
    results: list[list] = [[None] * len(prompts) for prompts, _ in batches]
    left = [len(prompts) for prompts, _ in batches]
    for b in [b for b, count in enumerate(left) if count == 0]:
        yield b, []
    submitted = set()
    try:
        while waiting or submitted:
            in_flight = len(submitted)
            room = max(0 if in_flight else 1, (engine.window - n * in_flight) // n)  # a window under n still runs
            for _ in range(min(room, len(waiting))):
                b, i = waiting.popleft()
                submitted.add(engine.submit(batches[b][0][i], params[b], (b, i)))
            for out in engine.step():
                submitted.discard(out.id)
                b, i = out.tag
                results[b][i] = [completion(engine, sample) for sample in out.samples]
                left[b] -= 1
                if left[b] == 0:
                    yield b, results[b]
                    results[b] = None  # handed on: the worker keeps no finished chunk
    finally:  # closed early, or failed: the engine is left with none of this stream's requests
        engine.abort(list(submitted))


def generate_completions(
    engine: VLLMEngine, prompt_ids: list[list[int]], sampling: SamplingConfig, n: int, seed: int | None = None
) -> list[list[Completion]]:
    """n completions per prompt, in prompt order."""
    return next(stream_completions(engine, [(prompt_ids, seed)], sampling, n))[1]


def completion(engine: VLLMEngine, sample: SampleOutput) -> Completion:
    return Completion(
        token_ids=sample.token_ids,
        logprobs=sample.logprobs,
        text=engine.completion_text(sample.text, sample.token_ids),
        finish_reason=sample.finish_reason or "error",
    )
