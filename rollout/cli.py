"""`python -m rollout`: run, generate, validate, config (and replay, stats where installed)."""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path
from typing import get_args

from contracts.config import ConfigError, EstimatorName
from contracts.config.load import load_config
from rollout.driver.stopping import JobStopped
from rollout.driver.supervise import mark_finished, supervise, supervised
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
    run.add_argument("--out", type=Path, default=None, help="run directory (default runs/RUN_NAME)")
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
        choices=get_args(EstimatorName),
        default="gae",
        help="advantage estimator (learner/estimators.py); grpo and rloo need n > 1 samples per prompt",
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
        print(f"config error: {e}", file=sys.stderr)
        return 2
    except JobStopped as e:
        print(
            f"rollout {args.command}: {e}; every finished iteration is archived, the same command resumes",
            file=sys.stderr,
        )
        return e.exit_code
    except Exception as e:
        code = exit_code(e)
        if code is None or args.debug or os.environ.get("ROLLOUT_DEBUG", "") not in ("", "0"):
            raise
        print(f"rollout {args.command}: {one_line(e)}", file=sys.stderr)
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


def cmd_run(args) -> int:
    from contracts.console import VERBOSE_ENV
    from rollout.driver.checkpoints import AUTO, NEVER
    from rollout.driver.job import run_job

    if args.verbose:
        os.environ[VERBOSE_ENV] = "1"
    cfg = load_config(args.config, args.overrides)
    out = _local_out(args.out or Path("runs") / cfg.run_name)
    run_job(cfg, out, resume=NEVER if args.no_resume else args.resume_from or AUTO)
    print(f"run directory: {out}  (archive {out}/rollouts, metrics {out}/metrics.jsonl)", file=sys.stderr)
    return 0


def cmd_generate(args) -> int:
    from contracts.console import VERBOSE_ENV
    from rollout.driver.generate import generate

    if args.verbose:
        os.environ[VERBOSE_ENV] = "1"
    cfg = load_config(args.config, [*args.overrides, f"data.prompts={args.prompts}"])
    generate(cfg, _local_out(args.out))
    return 0


def _local_out(out: Path) -> Path:
    """A run directory on this machine's disk. A URI (s3://, gs://: argparse has made it `s3:/...`) would
    be a local folder named `s3:`; under `ray job submit` a relative path is inside Ray's temporary
    copy of the working directory, which Ray deletes with the job."""
    if re.match(r"^[A-Za-z][A-Za-z0-9+.-]*:/", str(out)):
        raise ConfigError(
            f"--out {str(out).replace(':/', '://', 1)}: a URI; run storage on object stores is not supported yet: give a "
            "local path (on a cluster, one every node mounts)"
        )
    if not out.is_absolute() and "runtime_resources" in Path.cwd().parts:
        print(
            f"rollout: warning: --out {out} is inside Ray's temporary copy of the working directory "
            f"({Path.cwd()}), which Ray deletes with the job; give an absolute path",
            file=sys.stderr,
        )
    return out


def cmd_validate(args) -> int:
    from rollout.offline.validate import validate_files

    prompt_length, max_tokens = None, None
    if not args.no_length_check:
        cfg = load_config(args.config)
        prompt_length = _prompt_length(cfg)
        max_tokens = cfg.model.max_prompt_tokens
    return validate_files(args.files, prompt_length=prompt_length, max_prompt_tokens=max_tokens)


def _prompt_length(cfg):
    from transformers import AutoTokenizer

    from contracts.builtin_model import resolve_model_path
    from contracts.rendering import PromptRenderer

    renderer = PromptRenderer(
        AutoTokenizer.from_pretrained(resolve_model_path(cfg.model.path)), cfg.model.max_prompt_tokens
    )
    return lambda record: len(renderer.tokenizer(renderer.text(record), add_special_tokens=False)["input_ids"])


def cmd_config(args) -> int:
    from contracts.config.load import check, explain, to_yaml

    if args.explain:
        print("\n".join(explain()))
        return 0
    cfg = load_config(args.config, args.overrides)
    check(cfg)
    print(to_yaml(cfg), end="")
    return 0


def cmd_replay(args) -> int:
    from rollout.offline.replay import ReplayError, ReplayOptions, replay

    options = ReplayOptions(
        gamma=args.gamma,
        lam=args.lam,
        estimator=args.estimator,
        kl_coef=args.kl_coef,
        reward_config=args.reward_config,
        prompts=args.prompts,
    )
    try:
        report = replay(args.archive, args.out, options)
    except (ReplayError, FileNotFoundError) as e:
        print(f"replay: {e}", file=sys.stderr)
        return 2
    diff = "n/a" if report.max_return_diff is None else f"{report.max_return_diff:.3g}"
    print(
        f"replayed {report.rows} samples into {report.out}  (max |returns - stored returns| = {diff})", file=sys.stderr
    )
    if report.unmatched_prompts:
        print(f"{report.unmatched_prompts} samples re-scored without their data record (no reference)", file=sys.stderr)
    if args.train:
        _train_offline(args)
    return 0


def _train_offline(args) -> None:
    from rollout.archive import read_metadata
    from rollout.offline.train import train_offline

    metadata = read_metadata(args.archive)
    config = args.config
    if config is None:
        config = args.out / "run-config.yaml"
        config.write_text(metadata["config"])
    cfg = load_config(config)
    out = train_offline(
        args.out / "rollouts",
        cfg,
        args.out / "policy",
        model=args.model or metadata.get("model"),
        epochs=args.train_epochs,
    )
    print(f"offline-trained policy: {out}", file=sys.stderr)


def cmd_stats(args) -> int:
    import json

    from rollout.archive.manifest import format_manifest, read_manifest
    from rollout.offline.stats import compute_stats, format_comparison, format_table, plot_runs

    if args.manifest:
        try:
            manifest = read_manifest(args.archive)
        except FileNotFoundError as e:
            print(f"stats: {e}", file=sys.stderr)
            return 2
        print(json.dumps(manifest, indent=1) if args.json else format_manifest(manifest), end="\n" if args.json else "")
        return 0
    try:
        runs = [compute_stats(a) for a in [args.archive, *([args.compare] if args.compare else [])]]
    except FileNotFoundError as e:
        print(f"stats: {e}", file=sys.stderr)
        return 2
    if args.json:
        shown = [r.to_json(args.last, args.every) for r in runs]
        print(json.dumps(shown[0] if len(runs) == 1 else {"runs": shown}, indent=1))
    else:
        print(format_table(runs[0], args.last, args.every) if len(runs) == 1 else format_comparison(*runs), end="")
    if args.plot:
        labels = [f"{side}: {run.archive}" for side, run in zip("AB", runs)] if args.compare else None
        plot_runs(runs, args.plot, labels)
        print(f"plot: {args.plot}", file=sys.stderr)
    return 0


def cmd_report(args) -> int:
    from rollout.archive import run_dir_of
    from rollout.offline.report import write_report

    try:
        out = args.out or run_dir_of(args.run_dir) / "report.html"
        shown = write_report(args.run_dir, out, samples=args.samples)
    except FileNotFoundError as e:
        print(f"report: {e}", file=sys.stderr)
        return 2
    print(f"report: {out} ({shown} iterations)", file=sys.stderr)
    return 0


def cmd_plan(args) -> int:
    from rollout.offline.plan import format_plan, make_plan

    cfg = load_config(args.config, args.overrides)
    cluster = nodes = None
    if args.address:
        import ray

        from rollout.driver.resources import node_resources

        ray.init(address=args.address, logging_level="ERROR", log_to_driver=False)
        try:
            cluster, nodes = ray.cluster_resources(), node_resources()
        finally:
            ray.shutdown()
    plan = make_plan(cfg, cluster, args.gpu_memory_gb, nodes=nodes)
    print(format_plan(plan), end="")
    return 1 if plan.problems else 0


COMMANDS = {
    "plan": cmd_plan,
    "run": cmd_run,
    "generate": cmd_generate,
    "validate": cmd_validate,
    "config": cmd_config,
    "replay": cmd_replay,
    "stats": cmd_stats,
    "report": cmd_report,
}
