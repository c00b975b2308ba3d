"""The typed config of `reward train`: which base model, which preference data, how to train.

Built from the same pieces as the job config (`Base`, `doc`) and loaded the same way:
`load_config(path, overrides, root=RewardTrainConfig)`, so YAML files are overrides of these
defaults, unknown keys are errors and constraints are checked at load. `check` holds the rules
that need more than one field or the machine.
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec
import yaml
from msgspec import Meta, field

from contracts.config import Base, ConfigError, doc


class RewardModelSection(Base):
    path: Annotated[
        str,
        doc(
            "Base model whose backbone the reward model starts from: a local directory, a Hugging Face "
            "id (where the hub is reachable), or `builtin:tiny-llama`. Its language-model head is "
            "dropped and a new one-output score head is trained."
        ),
    ] = "builtin:tiny-llama"
    max_length: Annotated[
        int,
        doc(
            "Longest rendered prompt + response, in tokens; longer texts lose their beginning "
            "(the response at the end is kept), as `RewardModelScorer` does.",
            ge=2,
        ),
    ] = 256


class RewardDataSection(Base):
    files: Annotated[
        list[str],
        doc(
            "Preference files (JSONL or a JSON array); `reward train --data FILE...` replaces this list. "
            "Formats: pairwise `{prompt, response_a, response_b, label}`, multi-choice "
            "`{prompt, responses, label}`, scored `{prompt, response_a, response_b, score_a, score_b}`."
        ),
    ] = field(default_factory=list)
    format: Annotated[
        Literal["auto", "pairwise", "multi", "scored"],
        doc("Format of every record; `auto` detects it per record from its keys, so files may mix formats."),
    ] = "auto"
    on_bad_record: Annotated[
        Literal["stop", "skip"],
        doc(
            "What a bad record does: `stop` before training (after reporting every bad record as "
            "FILE:LINE: reason), or `skip` it (reported and counted in eval.json)."
        ),
    ] = "stop"
    multi_pairs: Annotated[
        Literal["best_vs_rest"],
        doc(
            "How a multi-choice record becomes training pairs. `best_vs_rest`: the labelled best response "
            "against each other one, so a record with k responses gives k-1 pairs (nothing is assumed "
            "about the order of the non-best responses)."
        ),
    ] = "best_vs_rest"
    heldout_fraction: Annotated[
        float,
        doc(
            "Fraction of records (not pairs: all pairs of a record go to the same side) held out for "
            "the pairwise accuracy in eval.json; at least one record is held out.",
            gt=0.0,
            lt=1.0,
        ),
    ] = 0.1


class RewardTrainSection(Base):
    epochs: Annotated[int, doc("Passes over the training pairs.", ge=1)] = 3
    batch_size: Annotated[
        int, doc("Pairs per optimizer step (each pair is two sequences in the same forward pass).", ge=1)
    ] = 32
    lr: Annotated[
        float,
        doc(
            "Peak AdamW learning rate: reached after the warm-up, then decayed linearly toward 0 over the "
            "remaining steps (a lower rate at the end settles the scores instead of leaving them jumping).",
            gt=0,
        ),
    ] = 1e-4
    warmup_steps: Annotated[int, doc("Steps of linear learning-rate warm-up from 0.", ge=0)] = 0
    weight_decay: Annotated[float, doc("AdamW weight decay.", ge=0.0)] = 0.0
    max_grad_norm: Annotated[float, doc("Gradient clipping norm.", gt=0.0)] = 1.0
    margin_weighting: Annotated[
        bool,
        doc(
            "Scored data: weight each pair's loss by its score margin (score_chosen - score_rejected), "
            "divided by the mean margin of the training pairs so the mean weight stays 1. Pairs without "
            "scores (pairwise, multi-choice) weigh 1."
        ),
    ] = False
    device: Annotated[
        Literal["auto", "cpu", "cuda"], doc("Where training runs; `auto` picks cuda when a GPU is visible.")
    ] = "auto"
    cpu_threads: Annotated[
        Annotated[int, Meta(ge=1)] | None,
        doc(
            "Threads torch uses on CPU, at least 1; null keeps torch's default (one per core). A small "
            "model gains nothing from more than one, and on a shared machine extra threads only spin."
        ),
    ] = None
    log_every: Annotated[int, doc("Steps between progress lines (step, loss, elapsed).", ge=1)] = 20


class RewardTrainConfig(Base):
    seed: Annotated[int, doc("Seed of the held-out split, the score head's initialisation and the pair order.")] = 0
    out_dir: Annotated[
        str,
        doc(
            "Output directory: the model in OUT/model, eval.json and the resolved config.yaml; "
            "`reward train --out DIR` replaces it."
        ),
    ] = "runs/reward-model"
    model: RewardModelSection = field(default_factory=RewardModelSection)
    data: RewardDataSection = field(default_factory=RewardDataSection)
    train: RewardTrainSection = field(default_factory=RewardTrainSection)


def check(cfg: RewardTrainConfig, *, cuda_available: bool) -> None:
    """Rules that need more than one field or the machine; ConfigError saying what to change."""
    problems = []
    if not cfg.data.files:
        problems.append("data.files is empty: list preference files in the config or pass --data FILE")
    if cfg.train.device == "cuda" and not cuda_available:
        problems.append("train.device is cuda but no GPU is visible: set it to auto or cpu")
    if problems:
        raise ConfigError("the config needs changes:\n  - " + "\n  - ".join(problems))


def to_yaml(cfg: RewardTrainConfig) -> str:
    """The resolved config, as a file `load_config(..., root=RewardTrainConfig)` reads back."""
    return yaml.safe_dump(msgspec.to_builtins(cfg), sort_keys=False)
