"""`python -m rollout`: run, generate, validate, config (and replay, stats where installed)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from contracts.config import ConfigError
from rollout.commands import COMMANDS, REPLAY_TRAINING
from rollout.driver.stopping import JobStopped, stop_behind
from rollout.driver.supervise import mark_finished, say_last, supervise, supervised
from rollout.errors import exit_code, one_line


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="rollout",
        description="Distributed PPO rollout service for LLMs.",
        epilog="Exit codes: 0 done, 1 the job failed, 2 a usage, config or data "
        "error, 130/143 stopped by SIGINT/SIGTERM (the same command resumes).",
    )
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error (also ROLLOUT_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="the PPO job: generate, reward, learn, archive")
    _config_args(run)
    run.add_argument(
        "--out",
        default=None,
        help="run directory (default runs/RUN_NAME), or a URI pyarrow opens (s3://bucket/run, gs://, file://)",
    )
    run.add_argument(
        "--verbose",
        action="store_true",
        help="show library output too (weight loading bars, INFO logs); also ROLLOUT_VERBOSE=1",
    )
    start = run.add_mutually_exclusive_group()
    start.add_argument(
        "--resume-from",
        type=Path,
        default=None,
        metavar="CHECKPOINT",
        help="resume from this checkpoint directory (default: the run directory's newest whole one)",
    )
    start.add_argument(
        "--no-resume", action="store_true", help="start from the model whatever checkpoints the run directory holds"
    )

    gen = sub.add_parser("generate", help="rollouts and rewards, no learning, into an archive")
    _config_args(gen)
    gen.add_argument("--prompts", required=True, help="prompt file (any seed format) or builtin:arith")
    gen.add_argument("--out", type=Path, required=True, help="output directory (archive in OUT/rollouts)")
    gen.add_argument("--verbose", action="store_true", help="show library output too; also ROLLOUT_VERBOSE=1")

    val = sub.add_parser("validate", help="check data files; FILE:LINE: reason for every bad record")
    val.add_argument("files", nargs="+")
    val.add_argument("--config", default=None, help="job config whose model and max_prompt_tokens to check against")
    val.add_argument("--no-length-check", action="store_true", help="skip the prompt token-length check")

    cfg = sub.add_parser("config", help="print the resolved config, or every field with --explain")
    _config_args(cfg)
    cfg.add_argument("--explain", action="store_true", help="every field with its default and meaning")

    rep = sub.add_parser("replay", help="recompute token rewards, advantages and returns from an archive")
    rep.add_argument("archive", help="run directory, its rollouts/ directory, or one .arrow file")
    rep.add_argument("--out", type=Path, required=True, help="output directory (archive in OUT/rollouts)")
    rep.add_argument("--gamma", type=float, default=None, help="GAE discount (default: the run's)")
    rep.add_argument("--lam", type=float, default=None, help="GAE lambda (default: the run's)")
    rep.add_argument(
        "--estimator",
        default="gae",
        help="advantage estimator registered in learner/estimators.py (gae, grpo, rloo, reinforce_pp; "
        "`rollout config --explain` lists them); grpo and rloo need n > 1 samples per prompt",
    )
    rep.add_argument("--kl-coef", type=float, default=None, help="new KL penalty coefficient (default: the run's)")
    rep.add_argument("--reward-config", default=None, help="YAML with a reward: section; re-score with its rules")
    rep.add_argument(
        "--prompts",
        default=None,
        help="prompt file or builtin:arith holding the references to re-score against "
        "(default: the run's data.prompts)",
    )

    rep.add_argument(
        "--train",
        action="store_true",
        help="then run PPO updates on the replayed archive (off-policy, behaviour logprobs in the "
        "ratio) and save the policy to OUT/policy",
    )
    rep.add_argument("--config", default=None, help="with --train: job config for the learner (default: the run's)")
    rep.add_argument("--model", default=None, help="with --train: starting policy (default: the run's model)")
    rep.add_argument("--train-epochs", type=int, default=1, help="with --train: passes over the archive")
    rep.add_argument(
        "--grpo-normalize-std",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="grpo: divide by the group's std (default: the run's learner.grpo_normalize_std)",
    )
    kinds = {"str": {}, "float": {"type": float}, "bool": {"action": argparse.BooleanOptionalAction}}
    for flag, (key, kind) in REPLAY_TRAINING.items():  # `rollout config --explain` says what each does
        rep.add_argument(flag, dest=key, default=None, **kinds[kind], help=f"with --train: {key} (default: the run's)")

    evl = sub.add_parser("eval", help="held-out evaluation (pass@k, mean@k, reward) of a checkpoint or a model")
    target = evl.add_mutually_exclusive_group(required=True)
    target.add_argument("--checkpoint", type=Path, default=None, help="a checkpoint directory (RUN/checkpoints/iter-N)")
    target.add_argument("--run", default=None, help="a run directory: its newest whole checkpoint, with its config")
    target.add_argument("--model", default=None, help="a model directory, Hugging Face id or builtin: (a base model)")
    _config_args(evl)
    evl.add_argument("--prompts", default=None, help="any data source (default: the config's eval.prompts)")
    evl.add_argument("--n-samples", type=_positive, default=None, metavar="K", help="samples per prompt (pass@K)")
    evl.add_argument(
        "--rule",
        action="append",
        default=[],
        metavar="NAME",
        help="score with this rule (repeatable; default: the run's reward)",
    )
    evl.add_argument("--out", type=Path, default=None, help="where OUT/eval goes (default RUN/evals/CHECKPOINT)")
    evl.add_argument("--json", action="store_true", help="print the figures as JSON")

    rpt = sub.add_parser("report", help="one self-contained HTML page of a run: its charts and a sample table")
    rpt.add_argument("run_dir", help="run directory (or its rollouts/ directory)")
    rpt.add_argument(
        "--out", type=Path, default=None, metavar="HTML", help="page to write (default RUN_DIR/report.html)"
    )
    rpt.add_argument("--samples", type=_positive, default=8, metavar="N", help="rows of the sample table")

    pln = sub.add_parser("plan", help="the job's actors, their placement and memory per GPU, before a cluster is used")
    _config_args(pln)
    pln.add_argument(
        "--address", default=None, help="a Ray cluster (ray://, host:port or auto) to check the plan against"
    )
    pln.add_argument("--gpu-memory-gb", type=float, default=None, help="GPU size to check the memory estimates against")

    env = sub.add_parser(
        "runtime-env",
        help="Ray's --runtime-env-json for `ray job submit`: this checkout's commit and the object store's settings",
    )
    env.add_argument(
        "--with-credentials",
        action="store_true",
        help="also AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN (shown in Ray's job details)",
    )

    sta = sub.add_parser("stats", help="per-iteration throughput, reward, KL and lengths of an archive")
    sta.add_argument("archive", help="run directory, its rollouts/ directory, or one .arrow file")
    sta.add_argument("--json", action="store_true", help="print JSON instead of a table")
    sta.add_argument("--plot", type=Path, default=None, metavar="PNG", help="plot reward and tokens/s to PNG")
    sta.add_argument("--compare", default=None, metavar="OTHER", help="a second archive, side by side")
    sta.add_argument("--last", type=_positive, default=None, metavar="N", help="only the last N iterations' rows")
    sta.add_argument(
        "--every",
        type=_positive,
        default=None,
        metavar="K",
        help="every K-th iteration's row (and the last), for long runs",
    )
    sta.add_argument(
        "--manifest",
        action="store_true",
        help="print what produced the archive instead: code, versions, seeds, model, lineage",
    )

    args = parser.parse_args(argv)
    if args.command == "run" and argv is None and not supervised():  # the program itself, not a call in-process
        return supervise(sys.argv[1:])
    try:
        return _dispatch(args)
    finally:
        mark_finished()  # a job that got here reported its own end, even as a traceback


def _dispatch(args: argparse.Namespace) -> int:
    try:
        return COMMANDS[args.command](args)
    except ConfigError as e:
        say_last(f"config error: {e}")
        return 2
    except (JobStopped, SystemError) as raised:
        e = stop_behind(raised)
        if e is None:
            raise
        say_last(f"rollout {args.command}: {e}; every finished iteration is archived, the same command resumes")
        return e.exit_code
    except Exception as e:
        code = exit_code(e)
        if code is None or args.debug or os.environ.get("ROLLOUT_DEBUG", "") not in ("", "0"):
            raise
        say_last(f"rollout {args.command}: {one_line(e)}")
        return code


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text}: must be at least 1")
    return value


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None, help="YAML job config (overrides of the defaults)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one field, e.g. --set learner.lr=1e-4 (repeatable)",
    )
