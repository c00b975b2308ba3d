"""Prompt rendering, a contract shared by the service and the learner's SFT warm-start: a record's
messages through the model's chat template into token ids, checked against the prompt budget, and
the template's text between an episode's turns (`PromptRenderer.observation_text`)."""

from __future__ import annotations

from collections.abc import Callable

import msgspec

from contracts.formats import FormatError, Message, PromptRecord
from contracts.jsonl import report_bad


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

    def text(self, record: PromptRecord, messages: list[Message] | None = None) -> str:
        """The prompt text of `record`: its messages (or `messages`, an episode's opening, where given)
        through the chat template, with the generation prompt of the model's turn."""
        return self._template(record.messages if messages is None else messages, generation_prompt=True)

    def render(self, record: PromptRecord, messages: list[Message] | None = None) -> PromptTask:
        """`record` (or `messages` in its place) rendered into token ids; FormatError naming the record
        when they are more than `max_prompt_tokens`."""
        text = self.text(record, messages)
        # The template already wrote the special tokens (bos); adding them again would double them.
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) > self.max_prompt_tokens:
            raise FormatError(
                f"{record.source}: prompt is {len(ids)} tokens, longer than the maximum "
                f"{self.max_prompt_tokens} (model.max_prompt_tokens)"
            )
        return PromptTask(prompt_id=record.prompt_id, prompt=text, prompt_ids=ids)

    def observation_text(
        self, history: list[Message], reply: str, observation: Message, *, reply_ended: bool = True
    ) -> str:
        """The text the chat template puts between the model's `reply` to `history` and its next turn:
        from just after the reply (after its eos where the model wrote one, `reply_ended`; a reply cut at
        its token limit gets the eos here) through `observation` to the generation prompt of the next
        model turn. Raises ValueError when the template does not render the reply as written after the
        generation prompt of `history` (a template that rewrites earlier turns)."""
        head = self._template(history, generation_prompt=True) + reply
        whole = self._template([*history, Message("assistant", reply), observation], generation_prompt=True)
        if not whole.startswith(head):
            raise ValueError(
                "the chat template does not render an assistant turn as the text the model wrote after the "
                "generation prompt, so an episode's turns cannot be joined; use a template that keeps earlier turns"
            )
        rest = whole[len(head) :]
        eos = self.tokenizer.eos_token or ""
        return rest[len(eos) :] if reply_ended and eos and rest.startswith(eos) else rest

    def _template(self, messages: list[Message], *, generation_prompt: bool) -> str:
        turns = [{"role": m.role, "content": m.content} for m in messages]
        return self.tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=generation_prompt)


def render_prompts(
    records: list[PromptRecord],
    renderer: PromptRenderer,
    *,
    on_bad_record: str,
    source: str,
    log,
    opening: Callable[[PromptRecord], list[Message]] | None = None,
) -> tuple[list[PromptRecord], dict[str, PromptTask]]:
    """Every record rendered once, at load, so a prompt too long for `model.max_prompt_tokens` is found
    before the cluster is used: reported as FILE:LINE, then the load stops or skips them per
    `data.on_bad_record`. `opening` gives the messages an episode starts from (the environment's
    `Environment.opening`); None renders each record's own messages. Returns the records kept and
    their tasks by prompt id."""
    kept, tasks, too_long = [], {}, []
    for record in records:
        try:
            tasks[record.prompt_id] = renderer.render(record, None if opening is None else opening(record))
            kept.append(record)
        except FormatError as e:
            too_long.append(str(e))
    report_bad(
        too_long,
        on_bad_record=on_bad_record,
        source=source,
        what="prompt(s) longer than model.max_prompt_tokens",
        fix=f"shorten them or raise the limit ({renderer.max_prompt_tokens})",
        error=FormatError,
        log=log,
        listed=20,
    )
    if not kept:
        raise FormatError(f"{source}: no prompt fits model.max_prompt_tokens ({renderer.max_prompt_tokens})")
    return kept, tasks
