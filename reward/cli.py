"""`python -m reward`: train a reward model from preference data, and score samples with one.

    reward train --config FILE [--data FILE...] [--out DIR] [--set KEY=VALUE...]
    reward score --model DIR --data FILE [--out FILE] [--batch-size N] [--device D]

`score` reads JSONL (or a JSON array) of `{"prompt", "response"}` records, renders each prompt
with the model's chat template as the rollout job does, and writes one JSON line per record:
the record's prompt and response plus `"score"`, to `--out` or stdout.

Exit codes: 0 done, 1 bad data (each bad record printed as `FILE:LINE: reason`), 2 a config or
command-line error.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from contracts.config import ConfigError
from contracts.config.load import load_config
from contracts.errors import UserError


class ScoreDataError(UserError, ValueError):
    """The file to score has bad records; they are printed above."""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="reward", description="Reward models: train and score.")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train a reward model from preference data (any of the three formats)")
    train.add_argument("--config", default=None, help="YAML reward-training config (overrides of the defaults)")
    train.add_argument(
        "--data", nargs="+", default=None, metavar="FILE", help="preference files; replace data.files of the config"
    )
    train.add_argument("--out", default=None, help="output directory; replaces out_dir of the config")
    train.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one field, e.g. --set train.lr=1e-3 (repeatable)",
    )

    score = sub.add_parser("score", help="score {prompt, response} records with a trained reward model")
    score.add_argument("--model", required=True, help="reward model directory (OUT/model of reward train)")
    score.add_argument("--data", required=True, help='JSONL or JSON array of {"prompt", "response"} records')
    score.add_argument("--out", type=Path, default=None, help="JSONL file to write (default stdout)")
    score.add_argument("--batch-size", type=int, default=32, help="texts per forward pass (default 32)")
    score.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")

    args = parser.parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


def cmd_train(args) -> int:
    from reward.train import train_reward_model
    from reward.train_config import RewardTrainConfig
    from reward.train_data import PreferenceDataError

    overrides = list(args.overrides)
    # --data and --out go through the same override path, so they are checked like any other field.
    if args.data:
        overrides.append(f"data.files={json.dumps(args.data)}")
    if args.out:
        overrides.append(f"out_dir={json.dumps(args.out)}")
    cfg = load_config(args.config, overrides, root=RewardTrainConfig)
    try:
        train_reward_model(cfg)
    except PreferenceDataError as e:
        print(f"data error: {e}", file=sys.stderr)
        return 1
    return 0


def cmd_score(args) -> int:
    if args.batch_size < 1:
        print("config error: --batch-size must be >= 1", file=sys.stderr)
        return 2
    try:
        samples = read_samples(args.data)
    except ScoreDataError as e:
        print(f"data error: {e}", file=sys.stderr)
        return 1
    from contracts.rendering import PromptRenderer
    from reward.scorer import RewardModelScorer
    from reward.train_data import render_prompt

    try:
        scorer = RewardModelScorer(args.model, batch_size=args.batch_size, device=args.device)
    except (OSError, ValueError) as e:
        print(f"error: {args.model}: not a reward model directory: {e}", file=sys.stderr)
        return 1
    renderer = PromptRenderer(scorer.tokenizer, max_prompt_tokens=scorer.max_length)
    texts = [render_prompt(renderer, prompt, source) + response for prompt, response, source in samples]
    scores = scorer.score(texts)
    out = args.out.open("w", encoding="utf-8") if args.out else sys.stdout
    try:
        for (prompt, response, _), value in zip(samples, scores):
            out.write(json.dumps({"prompt": prompt, "response": response, "score": value}, ensure_ascii=False) + "\n")
    finally:
        if args.out:
            out.close()
    print(f"scored {len(samples)} records" + (f" into {args.out}" if args.out else ""), file=sys.stderr)
    return 0


def read_samples(path: str) -> list[tuple[str, str, str]]:
    """(prompt, response, "FILE:LINE") per record; every bad record printed, then ScoreDataError."""
    from contracts.data_sources import read_data
    from contracts.formats import FormatError, require_object, text_field
    from contracts.jsonl import BadRecord

    samples: list[tuple[str, str, str]] = []
    bad: list[BadRecord] = []
    for line, obj in read_data(path):
        if isinstance(obj, BadRecord):
            bad.append(obj)
            continue
        try:
            record = require_object(obj)
            samples.append((text_field(record, "prompt"), _response(record), f"{path}:{line}"))
        except FormatError as e:
            bad.append(BadRecord(path, line, str(e)))
    for record in bad:
        print(record, file=sys.stderr)
    if bad:
        raise ScoreDataError(f"{path}: {len(bad)} bad record(s), listed above")
    return samples


def _response(record: dict) -> str:
    """The `response` field: any string, empty included (a completion may be empty)."""
    from contracts.formats import FormatError, field_names, type_name

    label, missing = field_names("response")
    if "response" not in record:
        raise FormatError(missing)
    if not isinstance(record["response"], str):
        raise FormatError(f"{label} must be a string, got {type_name(record['response'])}")
    return record["response"]


COMMANDS = {"train": cmd_train, "score": cmd_score}
