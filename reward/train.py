"""`reward train`: a Bradley-Terry reward model from preference data in any of the three formats.

The steps, in order: read every record (each bad one reported as `FILE:LINE: reason`, then stop or
skip), split records into training and held-out sets with the seed, turn each record into
(chosen, rejected) pairs, render every text exactly as `RewardWorker` feeds `RewardModelScorer`
(chat-templated prompt with the generation prompt, then the response), train a one-output sequence
classifier on the base model's backbone with loss `-logsigmoid(r_chosen - r_rejected)`, report the
held-out pairwise accuracy after each epoch, and save the model, tokenizer and `eval.json`.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any, TextIO

import msgspec
import torch
import torch.nn.functional as F

from contracts.builtin_model import resolve_model_path
from contracts.config import ConfigError
from contracts.device import fused_adamw
from contracts.rendering import PromptRenderer
from reward.train_config import RewardTrainConfig, check, to_yaml
from reward.train_data import PreferenceDataError, TextPair, load_records, split_records, text_pairs, weighted


class EpochResult(msgspec.Struct):
    epoch: int
    train_loss: float  # mean weighted loss over the epoch's steps
    accuracy: float  # held-out pairwise accuracy after the epoch
    seconds: float  # elapsed since training started


def train_reward_model(cfg: RewardTrainConfig, *, log: TextIO | None = None) -> dict[str, Any]:
    """Train per `cfg` into `cfg.out_dir`; returns what is written to OUT/eval.json.

    Raises ConfigError for a config that cannot run here, PreferenceDataError for unusable data and
    OSError for a data file or base model that cannot be read. Progress goes to `log`
    (default: stderr at call time).
    """
    log = log or sys.stderr
    check(cfg, cuda_available=torch.cuda.is_available())
    started = time.perf_counter()
    records, bad = load_records(cfg.data.files, cfg.data.format, cfg.data.on_bad_record, log=log)
    train_records, heldout_records = split_records(records, cfg.data.heldout_fraction, cfg.seed)
    with cpu_threads(cfg.train.cpu_threads):
        torch.manual_seed(cfg.seed)
        base = _base_model(cfg.model.path)
        model, tokenizer = build_reward_model(base)
        device = _resolve_device(cfg.train.device)
        model.to(device)
        renderer = PromptRenderer(tokenizer, cfg.model.max_length)
        train_pairs = weighted(text_pairs(train_records, renderer), cfg.train.margin_weighting)
        heldout_pairs = weighted(text_pairs(heldout_records, renderer), margin_weighting=False)
        if not train_pairs or not heldout_pairs:
            raise PreferenceDataError(
                f"no comparisons to {'train on' if not train_pairs else 'evaluate'}: every "
                "record of that split is a tie; add data or change data.heldout_fraction"
            )
        print(
            f"reward train: {len(records)} records; training on {len(train_records)} records / "
            f"{len(train_pairs)} pairs, holding out {len(heldout_records)} records / "
            f"{len(heldout_pairs)} pairs; base model {base} on {device}",
            file=log,
        )
        history = fit(
            model, Encoder(tokenizer, cfg.model.max_length, device), train_pairs, heldout_pairs, cfg, started, log=log
        )
    out = Path(cfg.out_dir)
    model_dir = save(model, tokenizer, cfg, out)
    report = {
        "accuracy": history[-1].accuracy,
        "pairs": len(heldout_pairs),
        "records": len(heldout_records),
        "train_pairs": len(train_pairs),
        "train_records": len(train_records),
        "bad_records": bad,
        "epochs": [msgspec.to_builtins(e) for e in history],
        "seconds": time.perf_counter() - started,
        "base_model": base,
        "model": str(model_dir),
    }
    (out / "eval.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(
        f"reward train: held-out accuracy {report['accuracy']:.3f} on {len(heldout_pairs)} pairs; "
        f"model in {model_dir}, eval in {out / 'eval.json'} ({report['seconds']:.0f}s)",
        file=log,
    )
    return report


def save(model, tokenizer, cfg: RewardTrainConfig, out: Path) -> Path:
    """Model and tokenizer into OUT/model (what `RewardModelScorer` loads), the config beside it."""
    model_dir = out / "model"
    model_dir.mkdir(parents=True, exist_ok=True)
    with quiet_transformers():
        model.save_pretrained(model_dir, safe_serialization=True)
    tokenizer.save_pretrained(model_dir)
    (out / "config.yaml").write_text(to_yaml(cfg), encoding="utf-8")
    return model_dir


def build_reward_model(base: str):
    """A one-label sequence classifier on `base`'s backbone, and its tokenizer (with a pad token).

    The score head is new (initialised from the current torch seed); the base model's LM head,
    if it has one, is not used.
    """
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base)
    if tokenizer.pad_token is None:
        # The classifier finds each row's last real token by its pad id, so there must be one;
        # eos is what the base model already ends texts with.
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.pad_token is None:
        raise ConfigError(f"model.path: {base}: the tokenizer has neither a pad nor an eos token to pad with")
    # The load report lists the new score head and the dropped LM head: expected here, not news.
    with quiet_transformers():
        model = AutoModelForSequenceClassification.from_pretrained(
            base, num_labels=1, pad_token_id=tokenizer.pad_token_id, dtype=torch.float32
        )
    model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


@contextmanager
def quiet_transformers() -> Iterator[None]:
    """Transformers' warnings and progress bars off for a block; our own progress lines say enough."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


class Encoder:
    """Token ids of rendered texts, tokenized once, batched as `RewardModelScorer` batches them.

    No special tokens are added (the chat template wrote them), long texts lose their beginning,
    rows are padded on the right with the pad id.
    """

    def __init__(self, tokenizer, max_length: int, device: torch.device):
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.device = device
        self._ids: dict[str, list[int]] = {}

    def ids(self, text: str) -> list[int]:
        if text not in self._ids:
            self._ids[text] = self.tokenizer(text, add_special_tokens=False)["input_ids"][-self.max_length :]
        return self._ids[text]

    def batch(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        rows = [self.ids(t) for t in texts]
        width = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), width), self.tokenizer.pad_token_id, dtype=torch.long)
        attention = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            input_ids[i, : len(row)] = torch.tensor(row)
            attention[i, : len(row)] = 1
        return {"input_ids": input_ids.to(self.device), "attention_mask": attention.to(self.device)}


def rewards(model, encoder: Encoder, texts: Sequence[str]) -> torch.Tensor:
    """The model's scalar score of each text, shape (len(texts),)."""
    return model(**encoder.batch(texts)).logits[:, 0].float()


def pair_loss(model, encoder: Encoder, pairs: Sequence[TextPair]) -> torch.Tensor:
    """Weighted Bradley-Terry loss, mean over pairs; chosen and rejected share one forward pass."""
    scores = rewards(model, encoder, [p.chosen for p in pairs] + [p.rejected for p in pairs])
    chosen, rejected = scores[: len(pairs)], scores[len(pairs) :]
    weights = torch.tensor([p.weight for p in pairs], device=scores.device)
    return (weights * -F.logsigmoid(chosen - rejected)).mean()


def pairwise_accuracy(model, encoder: Encoder, pairs: Sequence[TextPair], batch_size: int) -> float:
    """Fraction of pairs whose chosen text scores strictly higher than the rejected one.

    Each distinct text is scored once; a tie counts as wrong.
    """
    texts = sorted({t for p in pairs for t in (p.chosen, p.rejected)}, key=len)
    score: dict[str, float] = {}
    model.eval()
    with torch.inference_mode():
        for start in range(0, len(texts), 2 * batch_size):
            chunk = texts[start : start + 2 * batch_size]
            score.update(zip(chunk, rewards(model, encoder, chunk).tolist()))
    model.train()
    return sum(score[p.chosen] > score[p.rejected] for p in pairs) / len(pairs)


def fit(
    model,
    encoder: Encoder,
    train_pairs: list[TextPair],
    heldout_pairs: list[TextPair],
    cfg: RewardTrainConfig,
    started: float,
    *,
    log: TextIO | None = None,
) -> list[EpochResult]:
    """The training loop: seeded shuffles, AdamW with warm-up and clipping, held-out accuracy per epoch."""
    log = log or sys.stderr
    t = cfg.train
    total = math.ceil(len(train_pairs) / t.batch_size) * t.epochs
    optimizer = torch.optim.AdamW(
        model.parameters(),
        lr=t.lr,
        weight_decay=t.weight_decay,
        fused=fused_adamw(next(model.parameters()).device.type),
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, partial(lr_factor, warmup=t.warmup_steps, total=total))
    generator = torch.Generator().manual_seed(cfg.seed)
    history: list[EpochResult] = []
    step = 0
    model.train()
    for epoch in range(1, t.epochs + 1):
        order = torch.randperm(len(train_pairs), generator=generator).tolist()
        losses = []
        for start in range(0, len(order), t.batch_size):
            loss = pair_loss(model, encoder, [train_pairs[i] for i in order[start : start + t.batch_size]])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), t.max_grad_norm)
            optimizer.step()
            scheduler.step()
            step += 1
            losses.append(loss.item())
            if step % t.log_every == 0 or step == total:
                print(f"step {step}/{total}  loss {loss.item():.4f}  ({time.perf_counter() - started:.0f}s)", file=log)
        accuracy = pairwise_accuracy(model, encoder, heldout_pairs, t.batch_size)
        result = EpochResult(epoch, sum(losses) / len(losses), accuracy, time.perf_counter() - started)
        history.append(result)
        print(
            f"epoch {epoch}/{t.epochs}  train loss {result.train_loss:.4f}  held-out accuracy "
            f"{accuracy:.3f} ({len(heldout_pairs)} pairs)  ({result.seconds:.0f}s)",
            file=log,
            flush=True,
        )
    return history


def lr_factor(step: int, *, warmup: int, total: int) -> float:
    """Multiplier of the peak rate for optimizer step `step` (0-based): linear warm-up, linear decay."""
    if step < warmup:
        return (step + 1) / warmup
    return max(0.0, (total - step) / max(1, total - warmup))


@contextmanager
def cpu_threads(count: int | None) -> Iterator[None]:
    """torch's CPU thread count set for a block and restored after, as it is process-wide."""
    previous = torch.get_num_threads()
    if count is not None:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _base_model(path: str) -> str:
    try:
        return resolve_model_path(path)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def _resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)
