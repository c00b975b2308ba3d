"""Prompt rendering, a contract shared by the service and the learner's SFT warm-start: a record's
messages through the model's chat template into token ids, checked against the prompt budget."""

from __future__ import annotations

import msgspec

from rollout.formats import FormatError, PromptRecord


class PromptTask(msgspec.Struct):
    """A rendered prompt to sample `n` completions for."""
    prompt_id: str
    prompt: str
    prompt_ids: list[int]


class PromptRenderer:
    """Renders a record's messages with the tokenizer's chat template into a PromptTask."""

    def __init__(self, tokenizer, max_prompt_tokens: int):
        self.tokenizer = tokenizer
        self.max_prompt_tokens = max_prompt_tokens
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("the model's tokenizer has no chat template; add one to its tokenizer_config.json")

    def text(self, record: PromptRecord) -> str:
        messages = [{"role": m.role, "content": m.content} for m in record.messages]
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def render(self, record: PromptRecord) -> PromptTask:
        text = self.text(record)
        # The template already wrote the special tokens (bos); adding them again would double them.
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) > self.max_prompt_tokens:
            raise FormatError(f"{record.source}: prompt is {len(ids)} tokens, longer than the maximum "
                              f"{self.max_prompt_tokens} (model.max_prompt_tokens)")
        return PromptTask(prompt_id=record.prompt_id, prompt=text, prompt_ids=ids)
