"""Supervised warm-start on prompt/completion records (the seeds' SFT format).

The prompt is rendered with the chat template and the loss covers the completion and the eos that
ends it, so the policy learns both the answer and when to stop. A record carrying
`metadata["demonstration"]` (chat messages after the prompt, as `builtin:calc` writes: a tool call,
the environment's answer, the final answer) is one example of the whole episode, joined as an episode
is (`PromptRenderer.observation_text`), with the loss on the model's turns and their eos only, none on
the environment's. The result is a model directory, cached by its inputs: a second run with the same
model, data and settings reuses it.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from contracts.builtin_model import cache_dir
from contracts.config import ModelConfig
from contracts.device import fused_adamw
from contracts.formats import Message, PromptRecord
from contracts.rendering import PromptRenderer

DEMONSTRATION = "demonstration"  # the metadata key of a record's demonstrated episode

# (prompt ids, completion ids) or, for a demonstrated episode, (prompt ids, completion ids, loss mask):
# the completion is every token after the prompt, and the mask is 1 where the model wrote the token.
SFTExample = tuple[list[int], ...]


def sft_examples(records: list[PromptRecord], tokenizer, max_prompt_tokens: int) -> list[SFTExample]:
    """(prompt ids, completion ids + eos) for every record with a reference completion, and
    (prompt ids, episode ids, loss mask) for every record with a demonstration (`demonstration_example`)."""
    renderer = PromptRenderer(tokenizer, max_prompt_tokens)
    examples: list[SFTExample] = []
    for record in records:
        if DEMONSTRATION in record.metadata:
            examples.append(demonstration_example(record, renderer))
            continue
        if record.reference is None:
            continue
        prompt = renderer.render(record).prompt_ids
        completion = tokenizer(record.reference, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        examples.append((prompt, completion))
    if not examples:
        raise ValueError("SFT warm-up needs records with reference completions; the data has none")
    return examples


def demonstration_example(record: PromptRecord, renderer: PromptRenderer) -> SFTExample:
    """(prompt ids, episode ids, loss mask) of `record`'s demonstrated episode, joined turn by turn as the
    rollout joins one: each assistant message is the model's turn (its tokens and eos, mask 1), each
    other message the environment's, as the chat template renders it between the turns (mask 0).
    ValueError naming the record when the demonstration is not a list of {role, content} messages
    alternating from an assistant turn to an assistant turn."""
    tokenizer = renderer.tokenizer
    history = list(record.messages)
    prompt = renderer.render(record, history).prompt_ids
    ids: list[int] = []
    mask: list[int] = []
    messages = _demonstration(record)
    for i, message in enumerate(messages):
        if message.role != "assistant":
            continue  # rendered with the model's turn before it, which the template's text depends on
        turn = tokenizer(message.content, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        ids += turn
        mask += [1] * len(turn)
        if i + 1 < len(messages):
            observation = renderer.observation_text(history, message.content, messages[i + 1])
            between = tokenizer(observation, add_special_tokens=False)["input_ids"]
            ids += between
            mask += [0] * len(between)
            history += [message, messages[i + 1]]
    return (prompt, ids, mask)


def _demonstration(record: PromptRecord) -> list[Message]:
    """The record's demonstration as messages, its shape checked."""
    items = record.metadata[DEMONSTRATION]
    where = f'{record.source}: metadata "{DEMONSTRATION}"'
    if not isinstance(items, list) or not items:
        raise ValueError(f"{where} must be a non-empty list of {{role, content}} messages")
    messages = []
    for i, item in enumerate(items):
        if not (isinstance(item, dict) and isinstance(item.get("role"), str) and isinstance(item.get("content"), str)):
            raise ValueError(f"{where}[{i}] must be an object with string role and content, got {item!r}")
        expected_model = i % 2 == 0
        if (item["role"] == "assistant") != expected_model:
            raise ValueError(
                f"{where}[{i}] has role {item['role']!r}: the turns alternate, the model's (assistant) first "
                "and last, the environment's (any other role) between them"
            )
        messages.append(Message(item["role"], item["content"]))
    if messages[-1].role != "assistant":
        raise ValueError(f"{where} must end with the model's (assistant) final answer")
    return messages


def sft_batch(examples: list[SFTExample], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded input ids, attention mask and labels (-100 on prompt and padding, and on the
    environment's tokens of a demonstrated episode, where its loss mask is 0)."""
    width = max(len(example[0]) + len(example[1]) for example in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), -100, dtype=torch.long)
    attention = torch.zeros((len(examples), width), dtype=torch.long)
    for i, (p, c, *mask) in enumerate(examples):
        ids = p + c
        input_ids[i, : len(ids)] = torch.tensor(ids)
        target = torch.tensor(c)
        if mask:
            target[torch.tensor(mask[0]) == 0] = -100
        labels[i, len(p) : len(ids)] = target
        attention[i, : len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}


def train_sft(
    model_path: str,
    records: list[PromptRecord],
    out: Path,
    *,
    steps: int,
    lr: float,
    batch_size: int = 64,
    max_prompt_tokens: int = 128,
    seed: int = 0,
    log=sys.stderr,
) -> Path:
    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).train()
    examples = sft_examples(records, tokenizer, max_prompt_tokens)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, fused=fused_adamw(model.device.type))
    generator = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    for step in range(1, steps + 1):
        pick = torch.randint(len(examples), (min(batch_size, len(examples)),), generator=generator).tolist()
        loss = model(**sft_batch([examples[i] for i in pick], tokenizer.pad_token_id)).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if step % max(1, steps // 5) == 0 or step == steps:
            print(f"sft step {step}/{steps}  loss {loss.item():.3f}  ({time.perf_counter() - start:.0f}s)", file=log)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


def warm_start(model_path: str, records: list[PromptRecord], cfg: ModelConfig, *, seed: int, log=sys.stderr) -> str:
    """The SFT-warmed model directory for these inputs and `cfg.sft_*` settings, trained once and then
    reused from the cache."""
    steps, lr, max_prompt_tokens = cfg.sft_steps, cfg.sft_lr, cfg.max_prompt_tokens
    key = hashlib.sha256(
        json.dumps(
            {
                "model": str(Path(model_path).resolve()) if Path(model_path).exists() else model_path,
                "data": [r.prompt_id for r in records],
                **_demonstrations(records),
                "steps": steps,
                "lr": lr,
                "seed": seed,
            }
        ).encode()
    ).hexdigest()[:12]
    target = cache_dir() / f"sft-{key}"
    if (target / "config.json").exists():
        print(f"sft warm-up: reusing {target}", file=log)
        return str(target)
    print(f"sft warm-up: {steps} steps on {len(records)} records -> {target}", file=log)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".sft-", dir=target.parent))
    try:
        train_sft(
            model_path, records, staging, steps=steps, lr=lr, max_prompt_tokens=max_prompt_tokens, seed=seed, log=log
        )
        staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return str(target)


def _demonstrations(records: list[PromptRecord]) -> dict[str, str]:
    """The part of the cache key the records' demonstrations make: a prompt id names a problem, not how
    its episode is shown (the observation role may differ); nothing when no record has one, so the keys
    of warm-ups without demonstrations stay as they were."""
    shown = [r.metadata[DEMONSTRATION] for r in records if DEMONSTRATION in r.metadata]
    if not shown:
        return {}
    return {"demonstrations": hashlib.sha256(json.dumps(shown, sort_keys=True).encode()).hexdigest()}
