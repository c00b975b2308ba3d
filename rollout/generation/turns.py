"""The tokens an environment's turn adds to an episode, through the model's own chat template.

An episode's tokens are the prompt, then the model's tokens exactly as the engine sampled them, then the
environment's: what the template writes after an assistant turn's content (its end-of-turn marker, less
an eos the model already wrote), the observation as a `role` turn, and the opening of the model's next
turn. Re-rendering the whole conversation instead would re-tokenize the model's text, and the learner
would score other tokens than those the engine sampled.
"""

from __future__ import annotations

from typing import Any

_CONTENT = "\u2063turn\u2063"  # stands for a turn's content while the template's markup around it is read


class TurnRenderer:
    def __init__(self, tokenizer: Any, role: str = "user"):
        self.tokenizer, self.role = tokenizer, role
        self._before = [{"role": "user", "content": "x"}, {"role": "assistant", "content": _CONTENT}]
        closed = tokenizer.apply_chat_template(self._before, tokenize=False)
        if _CONTENT not in closed:
            raise ValueError("the model's chat template does not write an assistant turn's content")
        self._closed = closed
        self.end_of_turn = closed[closed.rindex(_CONTENT) + len(_CONTENT) :]  # e.g. "</s>\n"
        self.eos_id = tokenizer.eos_token_id
        self._eos_text = tokenizer.eos_token or ""

    def observation_ids(self, observation: str, model_ended: bool) -> list[int]:
        """Tokens after a model turn that ended (with its eos) or was cut (`model_ended` false): the close of
        its turn, `observation` as a `role` turn, and the opening of the model's next turn."""
        messages = [*self._before, {"role": self.role, "content": observation}]
        full = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        if not full.startswith(self._closed):
            raise ValueError(
                f"the model's chat template renders a {self.role} turn after an assistant turn by rewriting it"
            )
        close = self.end_of_turn
        if model_ended and self._eos_text and close.startswith(self._eos_text):
            close = close[len(self._eos_text) :]
        return self.tokenizer(close + full[len(self._closed) :], add_special_tokens=False)["input_ids"]

    def prompt(self, messages: list[dict[str, str]]) -> tuple[str, list[int]]:
        """(text, ids) of `messages` opened for the model's turn: an episode's prompt with `reset`'s turn."""
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return text, self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def decode(self, ids: list[int]) -> str:
        """An episode's response as text, the turns' markup kept so that a reader sees whose turn is whose."""
        return self.tokenizer.decode(ids, skip_special_tokens=False)
