"""Supervised warm-start on prompt/completion records (the seeds' SFT format).

The prompt is rendered with the chat template and the loss covers the completion and the eos that
ends it, so the policy learns both the answer and when to stop. The result is a model directory,
cached by its inputs: a second run with the same model, data and settings reuses it.
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
from contracts.formats import PromptRecord
from contracts.rendering import PromptRenderer


def sft_examples(records: list[PromptRecord], tokenizer, max_prompt_tokens: int) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, completion ids + eos) for every record with a reference completion."""
    renderer = PromptRenderer(tokenizer, max_prompt_tokens)
    examples = []
    for record in records:
        if record.reference is None:
            continue
        prompt = renderer.render(record).prompt_ids
        completion = tokenizer(record.reference, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        examples.append((prompt, completion))
    if not examples:
        raise ValueError("SFT warm-up needs records with reference completions; the data has none")
    return examples


def sft_batch(examples: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded input ids, attention mask and labels (-100 on prompt and padding)."""
    width = max(len(p) + len(c) for p, c in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), -100, dtype=torch.long)
    attention = torch.zeros((len(examples), width), dtype=torch.long)
    for i, (p, c) in enumerate(examples):
        ids = p + c
        input_ids[i, : len(ids)] = torch.tensor(ids)
        labels[i, len(p) : len(ids)] = torch.tensor(c)
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
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
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
