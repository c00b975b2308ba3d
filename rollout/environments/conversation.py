"""`conversation`: a multi-turn record (XTuner `conversation`, chat `messages`) played turn by turn.

The record `[system], user 1, assistant 1, user 2, assistant 2, ..., user N` (reference: its final
assistant turn) becomes an episode of N model turns. The prompt opens with the system message and
user 1; the model writes each assistant turn itself, and after each one but the last the record's next
user turn follows as the observation. The record's own assistant turns are the references the model's
turns are scored against: turn k gets the weighted sum of `rules` of its text against assistant k, as
its `StepResult.reward`. The last turn gets no reward here: the reward workers score it against the
record's reference (`reward.rules`), so it is not counted twice. A record with one user turn is an
episode of one turn.
"""

from __future__ import annotations

import math
from typing import Any

import msgspec

from contracts.environment import Environment, StepResult
from contracts.formats import Message
from reward.rule_params import check_params
from reward.rules import RULES
from rollout.environments.registry import ENVIRONMENTS


@ENVIRONMENTS.register("conversation")
class Conversation(Environment):
    """Params: `rules`, the reward rules each turn but the last is scored with (built-in names such as
    similarity or arithmetic, or your own package.module:function, called with no params), and
    `weights`, one per rule (null: 1 each). ValueError at construction for an unknown rule, a rule that
    needs params, or weights that do not fit."""

    def __init__(self, rules: list[str] = ("similarity",), weights: list[float] | None = None):
        if isinstance(rules, str) or not rules or not all(isinstance(name, str) for name in rules):
            raise ValueError(f"conversation: rules must be a non-empty list of rule names, got {rules!r}")
        self.rules = []
        for name in rules:
            rule = RULES.lookup(name, field="rules")  # check_environment puts "env.params: conversation: " first
            check_params(name, rule, {})  # a rule that needs params cannot be called here
            self.rules.append(rule)
        weights = [1.0] * len(rules) if weights is None else weights
        if isinstance(weights, str) or len(weights) != len(rules):
            raise ValueError(f"conversation: weights must be a list of {len(rules)} number(s), one per rule")
        for weight in weights:
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
                raise ValueError(f"conversation: weights must be finite numbers, got {weight!r}")
        self.weights = [float(w) for w in weights]
        self.record: Any = None
        self.questions: list[Message] = []  # the user turn each model turn answers, in order
        self.references: list[str | None] = []  # what each model turn is scored against
        self.turn = 0

    @classmethod
    def opening(cls, record: Any) -> list[Message]:
        """The record's messages up to and including its first user turn (a system message kept)."""
        first_user = next((i for i, message in enumerate(record.messages) if message.role == "user"), None)
        if first_user is None:
            raise ValueError(f"{record.source}: the record has no user turn to open the conversation with")
        return list(record.messages[: first_user + 1])

    def reset(self, record: Any) -> str | None:
        """Keeps the turns to play: the record's user turns (the first is in the prompt already, the
        others are the observations) and its assistant turns, then `record.reference`, as the model
        turns' references. Returns None: the prompt is the opening as it is."""
        turns = [message for message in record.messages if message.role != "system"]
        self.record = record
        self.questions = [message for message in turns if message.role == "user"]
        self.references = [message.content for message in turns if message.role == "assistant"]
        self.references.append(record.reference)
        self.turn = 0
        return None

    def step(self, text: str) -> StepResult:
        """The model wrote turn `text`: its reward against this turn's reference and the record's next
        user turn, or `done` (reward None) at the record's last turn. `info` holds the turn's index."""
        if self.record is None or self.turn >= len(self.questions):
            raise RuntimeError("conversation: step() called before reset() or after the episode was done")
        turn, self.turn = self.turn, self.turn + 1
        info = {"turn": turn}
        if turn == len(self.questions) - 1:
            return StepResult(done=True, info=info)
        question, reference = self.questions[turn].content, self.references[turn]
        # The rules read `reference` and `metadata` of a record: this turn's reference in the record's place.
        scored = msgspec.structs.replace(self.record, reference=reference)
        reward = sum(
            weight * rule(prompt=question, response=text, record=scored)
            for rule, weight in zip(self.rules, self.weights)
        )
        return StepResult(observation=self.questions[turn + 1].content, reward=float(reward), info=info)
