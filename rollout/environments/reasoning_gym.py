"""`reasoning_gym`: a reasoning-gym task with retries; a wrong answer is told so and may try again.

Each model turn is an answer, scored as the `reasoning_gym` rule scores one: the task's own scorer on the
record's entry (`metadata["entry"]`, which `data.prompts: reasoning_gym:TASK` keeps), the answer read from
the last `<answer>...</answer>` or the whole turn. A turn scoring at least `threshold` ends the episode; any
other gets the verdict as the next user turn ("That is not right (score 0.00). Try again.") and another
turn, until `env.max_turns` ends the episode. The reward rules score the last turn, so a right answer on
any try earns the episode's reward; `retry_penalty` puts a reward of -retry_penalty on each wrong turn, so
a right first answer is worth more than one found by trying.

reasoning-gym is imported when the environment is made, so the start-up check (`check_environment`) fails
with what to install when the extra is missing.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from contracts.config import ConfigError
from contracts.environment import Environment, StepResult
from contracts.reasoning_gym_source import import_reasoning_gym
from reward.reasoning_gym_rule import ANSWER_TAG, check_answer_tag, extract_answer, record_entry, score_answer
from rollout.environments.registry import ENVIRONMENTS

VERDICT = "That is not right (score {score:.2f}). Try again."


@ENVIRONMENTS.register("reasoning_gym")
class ReasoningGym(Environment):
    """Params: `threshold`, the score that counts as right (default 1.0); `retry_penalty` (>= 0), the
    penalty on each wrong turn (default 0: none); `answer_tag`, the tag the answer is read from ('' for the
    whole turn). ValueError for a bad value, ConfigError without reasoning-gym."""

    def __init__(self, threshold: float = 1.0, retry_penalty: float = 0.0, answer_tag: str = ANSWER_TAG):
        import_reasoning_gym("the reasoning_gym environment", ConfigError)
        if not _finite(threshold):
            raise ValueError(f"reasoning_gym: threshold must be a number, got {threshold!r}")
        if not (_finite(retry_penalty) and retry_penalty >= 0):
            raise ValueError(f"reasoning_gym: retry_penalty must be a number >= 0, got {retry_penalty!r}")
        check_answer_tag(answer_tag)
        self.threshold = float(threshold)
        self.retry_penalty = float(retry_penalty)
        self.answer_tag = answer_tag
        self.entry: Mapping[str, Any] | None = None
        self.tries = 0

    def reset(self, record: Any) -> str | None:
        """A new episode of `record`'s entry (ValueError when it has none); the prompt is left as it is."""
        self.entry = record_entry(record)
        self.tries = 0
        return None

    def step(self, text: str) -> StepResult:
        """`done` for a right answer; for a wrong one the verdict as the observation, and -retry_penalty as
        the turn's reward when there is a penalty. `info` holds the turn's `score` and whether it was right."""
        if self.entry is None:
            raise RuntimeError("reasoning_gym: step before reset")
        self.tries += 1
        score = score_answer(extract_answer(text, self.answer_tag), self.entry)
        info = {"score": score, "correct": score >= self.threshold, "tries": self.tries}
        if info["correct"]:
            return StepResult(done=True, info=info)
        reward = -self.retry_penalty if self.retry_penalty else None
        return StepResult(observation=VERDICT.format(score=score), reward=reward, info=info)


def _finite(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
