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
import contextlib
import json
import math
import sys
from pathlib import Path

from contracts.config import ConfigError
from contracts.config.load import load_config
from contracts.data_sources import DataSourceError
from contracts.errors import JobFailure, UserError

# What a record to score by rules holds; its other keys join its metadata, as a prompt record's do.
RULE_RECORD_FIELDS = frozenset({"prompt", "response", "reference", "metadata", "response_tokens"})


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

    score = sub.add_parser(
        "score",
        help="score {prompt, response} records with a trained reward model, or with reward rules only",
        description="Score records with a reward model (--model), or with reward rules only (--rule or "
        "--config: no model, no Ray), as a run would.",
        epilog='Writes one JSON line per record, in order: with --model the record plus "score"; with rules '
        '{"reward": total, "components": {name: score}}, the total weighted as the job weighs it and a failed '
        "rule's score null. Exit 0 done, 1 bad data (each bad record printed as FILE:LINE: reason, nothing "
        "scored), 2 a config or command-line error.",
    )
    scorer = score.add_mutually_exclusive_group(required=True)
    scorer.add_argument("--model", help="reward model directory (OUT/model of reward train)")
    scorer.add_argument(
        "--rule",
        action="append",
        metavar="NAME",
        help="a reward rule with its default params: a built-in or your own package.module:function "
        "(repeatable; each weighs 1)",
    )
    scorer.add_argument(
        "--config",
        metavar="JOB.yaml",
        help="a job config: its reward.rules with their params and weights (its reward model and server "
        "are not scored)",
    )
    score.add_argument(
        "--data",
        required=True,
        metavar="SPEC",
        help='records from any data source (JSONL, a JSON array, ...): {"prompt", "response"} for --model; '
        'with rules also "reference" (a string) and "metadata" (an object), both optional, and '
        '"response_tokens" (an integer), which rules counting tokens (overlong) need: there is no tokenizer here',
    )
    score.add_argument("--out", type=Path, default=None, metavar="FILE", help="JSONL file to write (default stdout)")
    score.add_argument(
        "--batch-size", type=int, default=None, metavar="N", help="--model: texts per forward pass (default 32)"
    )
    score.add_argument(
        "--device", choices=("auto", "cpu", "cuda"), default=None, help="--model: where it runs (default auto)"
    )

    args = parser.parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    except DataSourceError as e:
        print(f"data error: {e}", file=sys.stderr)
        return 1
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
    if args.model is None:
        return cmd_score_rules(args)
    batch_size = 32 if args.batch_size is None else args.batch_size
    if batch_size < 1:
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
        scorer = RewardModelScorer(args.model, batch_size=batch_size, device=args.device or "auto")
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


def cmd_score_rules(args) -> int:
    """`score --rule/--config`: the rules checked, then every record read and checked, then each scored
    by the job's `RuleScorer` and written as soon as it is, in order."""
    if args.batch_size is not None or args.device is not None:
        print("config error: --batch-size and --device go with --model", file=sys.stderr)
        return 2
    from reward.scorer import RuleScorer

    cfg = _rules_config(args.config) if args.config else _named_rules(args.rule)
    scorer = RuleScorer(cfg.rules, timeout_s=cfg.timeout_s, failed_value=cfg.failed_value)
    try:
        counting = tuple(component.name for component in scorer.components if component.counts_tokens)
        samples = read_rule_samples(args.data, counting_tokens=counting)
        output = args.out.open("w", encoding="utf-8") if args.out else contextlib.nullcontext(sys.stdout)
        with _scorer_log_to_stderr(), output as out:
            for prompt, response, record, tokens in samples:
                result = scorer.score(prompt, response, record, tokens)
                # A failed component is NaN in the scorer; JSON has no NaN, so it is null here.
                components = {name: None if math.isnan(v) else v for name, v in result.components.items()}
                out.write(json.dumps({"reward": result.total, "components": components}, ensure_ascii=False) + "\n")
    except ScoreDataError as e:
        print(f"data error: {e}", file=sys.stderr)
        return 1
    except JobFailure as e:  # too many rule calls past the time limit are still running
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        scorer.close()
    summary = f"scored {len(samples)} records" + (f" into {args.out}" if args.out else "")
    failed = ", ".join(f"{name} on {n} record{'s' if n > 1 else ''}" for name, n in scorer.failures.items() if n)
    if failed:
        summary += (
            f"; failed: {failed} (null there, {cfg.failed_value:g} in the reward; the first error of each is above)"
        )
    print(summary, file=sys.stderr)
    return 0


@contextlib.contextmanager
def _scorer_log_to_stderr():
    """The scorer's warnings (the first error of each failing rule) on stderr as bare lines, whatever
    logging the process has set up: they are this command's report, not a log."""
    import logging

    logger = logging.getLogger("reward.scorer")
    handler = logging.StreamHandler(sys.stderr)
    handler.setLevel(logging.WARNING)
    saved = logger.propagate, logger.level
    logger.addHandler(handler)
    logger.propagate = False
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.propagate, logger.level = saved


def _rules_config(path: str):
    """The `reward` section of the job config at `path`, its rules checked as `rollout run` checks them
    before it starts: ConfigError naming the file and each bad field."""
    from reward.checks import rule_problems

    cfg = load_config(path).reward
    problems = rule_problems(cfg)
    if len(problems) == 1:
        raise ConfigError(f"{path}: {problems[0]}")
    if problems:
        raise ConfigError(f"{path} needs changes:\n  - " + "\n  - ".join(problems))
    unscored = [field for field, value in (("reward.model", cfg.model), ("reward.remote", cfg.remote)) if value]
    if unscored:
        verb = "is" if len(unscored) == 1 else "are"
        print(
            f"note: {path}: {' and '.join(unscored)} {verb} not scored here; each reward is the rules' part only",
            file=sys.stderr,
        )
    return cfg


def _named_rules(names: list[str]):
    """The `reward` section of a default job whose rules are `names`, each with weight 1 and its default
    params (the ones the job fills, such as overlong's max_tokens, filled as a job fills them).
    ConfigError naming `--rule NAME` for each that is unknown, does not import or needs params."""
    from reward.rule_params import check_params
    from reward.rules import RULES

    cfg = load_config(None, [f"reward.rules={json.dumps([{'name': name} for name in names])}"]).reward
    problems = []
    for spec in cfg.rules:
        try:
            check_params(spec.name, RULES.lookup(spec.name, field="--rule"), spec.params)
        except ConfigError as e:
            problems.append(str(e))
        except ValueError as e:
            problems.append(f"--rule {spec.name}: {e}; a job config (--config) sets params")
    if problems:
        raise ConfigError("\n".join(problems))
    return cfg


def read_rule_samples(path: str, *, counting_tokens: tuple[str, ...] = ()) -> list[tuple[str, str, object, int | None]]:
    """(prompt, response, record, response tokens) per record, the record a `PromptRecord` as the job's
    rules see one; every bad record printed as `FILE:LINE: reason`, then ScoreDataError. Where rules
    read the response's token count (`counting_tokens` names them), each record must give
    `response_tokens`: there is no tokenizer here to count them."""
    from contracts.data_sources import parse_records
    from contracts.jsonl import BadRecord

    samples = []
    bad: list[BadRecord] = []
    for item in parse_records(path, lambda obj, source: _rule_sample(obj, source, counting_tokens)):
        (bad if isinstance(item, BadRecord) else samples).append(item)
    for record in bad:
        print(record, file=sys.stderr)
    if bad:
        raise ScoreDataError(f"{path}: {len(bad)} bad record(s), listed above")
    return samples


def _rule_sample(obj: object, source: str, counting_tokens: tuple[str, ...]) -> tuple[str, str, object, int | None]:
    """One record to score by rules; FormatError naming the field that is wrong."""
    from contracts.formats import FormatError, Message, PromptRecord, record_id, require_object, text_field, type_name

    record = require_object(obj)
    prompt = text_field(record, "prompt")
    response = _response(record)
    reference = record.get("reference")
    if reference is not None and not isinstance(reference, str):
        raise FormatError(f'field "reference" must be a string or null, got {type_name(reference)}')
    metadata = record.get("metadata")
    if metadata is not None and not isinstance(metadata, dict):
        raise FormatError(f'field "metadata" must be an object, got {type_name(metadata)}')
    tokens = record.get("response_tokens")
    if tokens is None and counting_tokens:
        raise FormatError(
            f'missing field "response_tokens": {", ".join(counting_tokens)} counts the response\'s tokens and '
            "reward score has no tokenizer; give each record its response's length in tokens"
        )
    if tokens is not None and (isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 0):
        raise FormatError(f'field "response_tokens" must be a whole number >= 0, got {tokens!r}')
    extra = {key: value for key, value in record.items() if key not in RULE_RECORD_FIELDS}
    messages = [Message("user", prompt)]
    return (
        prompt,
        response,
        PromptRecord(record_id(record), messages, reference, extra | (metadata or {}), source),
        tokens,
    )


COMMANDS = {"train": cmd_train, "score": cmd_score}
