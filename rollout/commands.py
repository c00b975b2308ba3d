"""What each `rollout` command does, given its parsed arguments; `rollout.cli` parses them. Heavy
imports (torch, Ray, vLLM) happen inside the command that needs them, so `--help` and the offline
tools start fast."""

from __future__ import annotations

import os
import sys

from contracts.config.load import load_config


def cmd_run(args) -> int:
    from contracts.console import VERBOSE_ENV
    from rollout import api

    if args.verbose:
        os.environ[VERBOSE_ENV] = "1"
    resume = False if args.no_resume else args.resume_from or True
    run = api.run(args.config, out=args.out, overrides=args.overrides, resume=resume)
    out = run.uri or run.path
    print(f"run directory: {out}  (archive {out}/rollouts, metrics {out}/metrics.jsonl)", file=sys.stderr)
    return 0


def cmd_generate(args) -> int:
    from contracts.console import VERBOSE_ENV
    from rollout import api

    if args.verbose:
        os.environ[VERBOSE_ENV] = "1"
    api.generate(args.config, out=args.out, prompts=args.prompts, overrides=args.overrides)
    return 0


def cmd_validate(args) -> int:
    from rollout.offline.validate import validate_files

    prompt_length, max_tokens = None, None
    cfg = load_config(args.config)
    if not args.no_length_check:
        prompt_length = _prompt_length(cfg)
        max_tokens = cfg.model.max_prompt_tokens
    return validate_files(args.files, prompt_length=prompt_length, max_prompt_tokens=max_tokens, data=cfg.data)


def _prompt_length(cfg):
    from contracts.builtin_model import load_tokenizer
    from contracts.rendering import PromptRenderer

    renderer = PromptRenderer(load_tokenizer(cfg.model.path), cfg.model.max_prompt_tokens)
    return lambda record: len(renderer.tokenizer(renderer.text(record), add_special_tokens=False)["input_ids"])


def cmd_config(args) -> int:
    from contracts.config.load import check, explain, to_yaml
    from learner.estimators import check_learner_names
    from reward.checks import check_reward_config
    from rollout.environments.registry import check_environment

    if args.explain:
        print("\n".join(explain(registered=registered_names())))
        return 0
    cfg = load_config(args.config, args.overrides)
    check(cfg)
    check_learner_names(cfg.learner, cfg.rollout.n_samples)
    check_reward_config(cfg.reward)
    check_environment(cfg.env)
    print(to_yaml(cfg), end="")
    return 0


def registered_names() -> dict[str, tuple[str, ...]]:
    """The built-in names of each registry a config field names, by the field's line in `--explain`
    (a list's field, such as `reward.rules[].name`, on its list's line)."""
    from contracts.data_sources import DATA_SOURCES
    from learner.advantages import KL_ESTIMATORS
    from learner.estimators import ESTIMATORS
    from learner.losses import LOSS_AGGREGATIONS, POLICY_LOSSES
    from reward.rules import RULES
    from rollout.environments.registry import ENVIRONMENTS

    names = {}
    for registry in (ESTIMATORS, POLICY_LOSSES, LOSS_AGGREGATIONS, KL_ESTIMATORS, RULES, ENVIRONMENTS, DATA_SOURCES):
        names[registry.field.partition("[]")[0]] = registry.names()
    return names


# `rollout replay --train`'s flags for the settings of the objective it trains with: flag -> (key, kind).
REPLAY_TRAINING = {
    "--loss-agg-mode": ("learner.loss_agg_mode", "str"),
    "--clip-eps-high": ("learner.clip_eps_high", "float"),
    "--mask-truncated": ("learner.mask_truncated", "bool"),
    "--dynamic-sampling": ("rollout.dynamic_sampling.enabled", "bool"),
    "--ratio-level": ("learner.ratio_level", "str"),
    "--rollout-correction": ("learner.rollout_correction.mode", "str"),
}


def cmd_replay(args) -> int:
    from rollout import api
    from rollout.offline.rescore import ReplayError

    given = [flag for flag, (key, _) in REPLAY_TRAINING.items() if getattr(args, key) is not None]
    if given and not args.train:
        print(f"replay: {', '.join(given)} set(s) how --train trains: add --train", file=sys.stderr)
        return 2
    training = {}
    if args.train:
        overrides = {key: value for key, _ in REPLAY_TRAINING.values() if (value := getattr(args, key)) is not None}
        training = {"config": args.config, "overrides": overrides, "model": args.model}
        training["train_epochs"] = args.train_epochs
    try:
        run = api.replay(
            args.archive,
            args.out,
            gamma=args.gamma,
            lam=args.lam,
            estimator=args.estimator,
            kl_coef=args.kl_coef,
            reward_config=args.reward_config,
            prompts=args.prompts,
            grpo_normalize_std=args.grpo_normalize_std,
            train=args.train,
            **training,
        )
    except ReplayError as e:
        print(f"replay: {e}", file=sys.stderr)
        return 2
    report = run.summary
    diff = "n/a" if report["max_return_diff"] is None else f"{report['max_return_diff']:.3g}"
    print(
        f"replayed {report['rows']} samples into {run.path / 'rollouts'}  (max |returns - stored returns| = {diff})",
        file=sys.stderr,
    )
    if report["unmatched_prompts"]:
        print(
            f"{report['unmatched_prompts']} samples re-scored without their data record (no reference)",
            file=sys.stderr,
        )
    if args.train:
        print(f"offline-trained policy: {report['policy']}", file=sys.stderr)
    return 0


def cmd_stats(args) -> int:
    import json

    from rollout.archive.manifest import format_manifest, read_manifest
    from rollout.offline.stats import compute_stats
    from rollout.offline.stats_view import format_comparison, format_table, plot_runs

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


def cmd_eval(args) -> int:
    """`rollout eval`: one held-out evaluation of a checkpoint (a run's newest by default) or a model."""
    import json

    from rollout import api

    result = api.evaluate(
        args.run,
        checkpoint=args.checkpoint,
        model=args.model,
        config=args.config,
        overrides=args.overrides,
        prompts=args.prompts,
        n_samples=args.n_samples,
        rules=args.rule,
        out=args.out,
    )
    figures = result.summary
    if args.json:
        print(json.dumps(figures, indent=1))
    else:
        width = max(len(k) for k in figures)
        print(
            "".join(
                f"{k:{width}s}  {v:.4f}\n" if isinstance(v, float) else f"{k:{width}s}  {v}\n"
                for k, v in figures.items()
            ),
            end="",
        )
    print(f"eval archive: {result.path / 'eval'}", file=sys.stderr)
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


def cmd_runtime_env(args) -> int:
    import json

    from rollout.driver.submit_env import runtime_env

    print(json.dumps(runtime_env(credentials=args.with_credentials)))
    return 0


COMMANDS = {
    "plan": cmd_plan,
    "runtime-env": cmd_runtime_env,
    "run": cmd_run,
    "generate": cmd_generate,
    "validate": cmd_validate,
    "config": cmd_config,
    "replay": cmd_replay,
    "stats": cmd_stats,
    "report": cmd_report,
    "eval": cmd_eval,
}
