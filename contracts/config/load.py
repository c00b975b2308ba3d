"""Reading a config: YAML files and `--set a.b=v` overrides merged over the defaults of the tree in
`contracts.config`, field constraints checked on load, cross-field rules once at start-up (`check`),
and the tree written back (`to_yaml`) or described field by field (`explain`).
"""

from __future__ import annotations

import copy
import math
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import msgspec
import yaml
from msgspec import Struct

from contracts.config import Base, ConfigError, JobConfig, RolloutConfig
from contracts.config.evaluation import eval_sampling


def load_config(
    path: str | os.PathLike | Mapping[str, Any] | None = None, overrides: list[str] = (), root: type[Base] = JobConfig
):
    """Defaults, then the YAML file at `path` (or a mapping of its sections), then `a.b=v` overrides; field
    constraints checked.

    `root` is the tree's type: `JobConfig` for jobs, other roots (reward training) reuse the rules.
    """
    tree: dict[str, Any] = {}
    source = "defaults"
    if isinstance(path, Mapping):
        source, tree = "the config dict", copy.deepcopy(dict(path))
    elif path is not None:
        source = str(path)
        try:
            loaded = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such config file") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
        tree = loaded or {}
    for item in overrides:
        _apply_override(tree, item)
        source += f" + --set {item}"
    if root is JobConfig:
        _renamed(tree)
    try:
        # strict=False: YAML reads "1e-4" as a string; numeric strings convert to the field type.
        cfg = msgspec.convert(tree, root, strict=False)
    except msgspec.ValidationError as e:
        raise ConfigError(f"{source}: {_readable(str(e))}") from None
    infinite = _non_finite(cfg)
    if infinite:
        raise ConfigError(f"{source}: {', '.join(infinite)}: must be a finite number")
    return _derived(cfg) if root is JobConfig else cfg


OVERLONG_RULE = "overlong"  # reward.rules.overlong, whose max_tokens a job fills in
AGENT_ENV = "openai_agent"  # its agent function's reward is component `agent` (reward.agent_weight)


# Settings an older version of the project wrote (a run's config.yaml, an archive's metadata): their key
# and value today, so `rollout replay --train` and resumes read old runs' configs.
_LOSS_AGG = {"token": "token_mean", "sequence": "seq_mean_token_mean"}


def _renamed(tree: dict[str, Any]) -> None:
    learner = tree.get("learner")
    if isinstance(learner, dict) and "loss_agg" in learner and "loss_agg_mode" not in learner:
        old = learner.pop("loss_agg")
        learner["loss_agg_mode"] = _LOSS_AGG.get(old, old)
    if isinstance(learner, dict) and "behaviour_is_cap" in learner and "rollout_correction" not in learner:
        cap = learner.pop("behaviour_is_cap")
        learner["rollout_correction"] = {"mode": "none"} if cap is None else {"mode": "token_tis", "upper": cap}
        was = "null" if cap is None else cap
        print(
            f"note: learner.behaviour_is_cap {was} is now learner.rollout_correction {learner['rollout_correction']}",
            file=sys.stderr,
        )


def _derived(cfg: JobConfig) -> JobConfig:
    """Defaults that are other fields' values, filled in once, here."""
    if cfg.env.name == AGENT_ENV and cfg.reward.agent_weight is None:
        cfg = msgspec.structs.replace(cfg, reward=msgspec.structs.replace(cfg.reward, agent_weight=1.0))
    if cfg.learner.loss_agg_norm_tokens is None:
        learner = msgspec.structs.replace(cfg.learner, loss_agg_norm_tokens=cfg.rollout.sampling.max_tokens)
        cfg = msgspec.structs.replace(cfg, learner=learner)
    # The `overlong` rule's limit is the run's own: the most tokens a response (an episode) can hold.
    limit = cfg.env.max_episode_tokens if cfg.env.name is not None else cfg.rollout.sampling.max_tokens
    rules = [
        msgspec.structs.replace(spec, params={"max_tokens": limit, **spec.params})
        if spec.name == OVERLONG_RULE and "max_tokens" not in spec.params
        else spec
        for spec in cfg.reward.rules
    ]
    if rules != cfg.reward.rules:
        cfg = msgspec.structs.replace(cfg, reward=msgspec.structs.replace(cfg.reward, rules=rules))
    if cfg.eval.rules:  # the same for the evaluation's own rules, at its own length
        limit = (
            cfg.env.max_episode_tokens
            if cfg.env.name is not None
            else eval_sampling(cfg.eval, cfg.rollout.sampling).max_tokens
        )
        rules = [
            msgspec.structs.replace(spec, params={"max_tokens": limit, **spec.params})
            if spec.name == OVERLONG_RULE and "max_tokens" not in spec.params
            else spec
            for spec in cfg.eval.rules
        ]
        cfg = msgspec.structs.replace(cfg, eval=msgspec.structs.replace(cfg.eval, rules=rules))
    return cfg


def _non_finite(node: Any, path: str = "") -> list[str]:
    """Dotted paths of float fields holding inf or nan: `gt=0` lets inf through, and one inf learning
    rate turns every weight into NaN after the first update."""
    if isinstance(node, float):
        return [] if math.isfinite(node) else [path]
    if isinstance(node, Struct):
        return [
            bad
            for name in node.__struct_fields__
            for bad in _non_finite(getattr(node, name), f"{path}.{name}" if path else name)
        ]
    if isinstance(node, list):
        return [bad for i, item in enumerate(node) for bad in _non_finite(item, f"{path}.{i}")]
    if isinstance(node, dict):  # rule params
        return [bad for key, item in node.items() for bad in _non_finite(item, f"{path}.{key}")]
    return []


def _apply_override(tree: dict[str, Any], item: str) -> None:
    key, sep, raw = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"--set {item}: expected KEY=VALUE, e.g. learner.lr=1e-4")
    *parents, leaf = key.split(".")
    node = tree
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {item}: {part} is not a section")
    try:
        node[leaf] = yaml.safe_load(raw) if raw else ""
    except yaml.YAMLError as e:
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"--set {item}: the value is not valid YAML ({problem})") from None


def _readable(message: str) -> str:
    """msgspec says 'Object contains unknown field `x` - at `$.a`'; users want 'a.x: unknown key'."""
    text, _, where = message.partition(" - at `$")
    path = where.rstrip("`").lstrip(".")
    path = path.replace("[", ".").replace("]", "")
    if text.startswith("Object contains unknown field `"):
        name = text.split("`")[1]
        return f"{path + '.' if path else ''}{name}: unknown key"
    if text.startswith("Object missing required field `"):
        name = text.split("`")[1]
        return f"{path + '.' if path else ''}{name}: required key missing"
    text = text.replace("`", "")
    return f"{path}: {text[0].lower() + text[1:]}" if path else text


def check(cfg: JobConfig, *, cuda_available: bool | None = None) -> None:
    """Cross-field rules, once at start-up. Raises ConfigError listing every problem and its fix."""
    problems: list[str] = []
    samples = cfg.rollout.prompts_per_iteration * cfg.rollout.n_samples
    if cfg.rollout.dynamic_sampling.enabled and cfg.rollout.n_samples < 2:
        problems.append(
            f"rollout.dynamic_sampling compares the samples of each prompt, so it needs rollout.n_samples >= 2 "
            f"(it is {cfg.rollout.n_samples}): raise n_samples or turn it off"
        )
    if cfg.learner.minibatch_size > samples:
        problems.append(
            f"learner.minibatch_size ({cfg.learner.minibatch_size}) exceeds the samples per iteration "
            f"(rollout.prompts_per_iteration x rollout.n_samples = {samples}): lower it or raise those"
        )
    if cfg.learner.num_ranks > cfg.learner.minibatch_size:
        problems.append(
            f"learner.num_ranks ({cfg.learner.num_ranks}) exceeds learner.minibatch_size "
            f"({cfg.learner.minibatch_size}): every rank needs samples in each minibatch; raise minibatch_size"
        )
    problems.extend(_engine_rejects(cfg.rollout))
    if cfg.rollout.num_workers > cfg.rollout.prompts_per_iteration:
        problems.append(
            f"rollout.num_workers ({cfg.rollout.num_workers}) exceeds rollout.prompts_per_iteration "
            f"({cfg.rollout.prompts_per_iteration}): some workers would idle; lower num_workers"
        )
    # Rule names and params need reward code (the registry, users' modules): reward.checks does them.
    repeated = sorted({b for b in cfg.tracking.backends if cfg.tracking.backends.count(b) > 1})
    if repeated:
        problems.append(f"tracking.backends: {', '.join(repeated)} named twice; name each backend once")
    # A teacher's per-token reward is a signal of its own (on-policy distillation): then no reward is needed.
    no_reward = not cfg.reward.rules and cfg.reward.model is None and cfg.reward.remote is None
    if no_reward and cfg.learner.teacher is None:
        problems.append(
            "reward: no rules, no model, no server and no learner.teacher; add reward.rules, reward.model, "
            "reward.remote or a teacher to distil from"
        )
    if cfg.rollout.cpu_kv_cache_gb is not None and cfg.rollout.cpu_kv_cache_gb <= 0:
        problems.append("rollout.cpu_kv_cache_gb must be positive, or null to size it from the engine batch")
    if cfg.learner.old_logprobs == "behaviour" and cfg.rollout.max_staleness > 0:
        problems.append(
            f"learner.old_logprobs behaviour takes the engine's logprobs as the weights before the update, which "
            f"they are only at rollout.max_staleness 0 (it is {cfg.rollout.max_staleness}): set one of them back"
        )
    if cfg.rollout.partial_rollouts and cfg.rollout.max_staleness < 1:
        problems.append(
            "rollout.partial_rollouts carries unfinished groups into the next iteration, which trains them one "
            "policy version later: set rollout.max_staleness to 1 or more"
        )
    if cfg.rollout.partial_rollouts and cfg.env.name is not None:
        problems.append(
            f"rollout.partial_rollouts resumes single completions, not episodes (env.name is {cfg.env.name}): "
            "turn one of them off"
        )
    if cfg.learner.kl.target is not None and cfg.learner.kl.target <= 0:
        problems.append("learner.kl.target must be positive, or null for a fixed coefficient")
    if cfg.model.max_prompt_tokens + cfg.rollout.sampling.max_tokens > cfg.rollout.max_model_len:
        problems.append(
            f"model.max_prompt_tokens + rollout.sampling.max_tokens "
            f"({cfg.model.max_prompt_tokens} + {cfg.rollout.sampling.max_tokens}) exceeds "
            f"rollout.max_model_len ({cfg.rollout.max_model_len}): raise max_model_len"
        )
    problems.extend(_episode_problems(cfg))
    problems.extend(_eval_problems(cfg))
    if cuda_available is False:
        for section in ("rollout", "learner"):
            if getattr(cfg, section).device == "cuda":
                problems.append(f"{section}.device is cuda but no GPU is visible: set it to auto or cpu")
    if problems:
        raise ConfigError("the config needs changes:\n  - " + "\n  - ".join(problems))


def _episode_problems(cfg: JobConfig) -> list[str]:
    """Rules of multi-turn episodes (`env.name` set); the name and params themselves need the registry
    in rollout/, which checks them (`rollout.environments.registry.check_environment`)."""
    if cfg.env.name is None:
        return []
    problems = []
    if cfg.env.name == AGENT_ENV and cfg.rollout.dynamic_sampling.enabled:
        problems.append(
            "rollout.dynamic_sampling with env.name openai_agent: an agent's episode may be several rows "
            "(segments), and dynamic sampling counts rollout.n_samples rows per prompt; turn it off"
        )
    # Each turn is generated from a prompt holding everything before it: the episode's first prompt
    # and every token of the episode so far, so the longest turn's prompt is the two together.
    if cfg.model.max_prompt_tokens + cfg.env.max_episode_tokens > cfg.rollout.max_model_len:
        problems.append(
            f"model.max_prompt_tokens + env.max_episode_tokens ({cfg.model.max_prompt_tokens} + "
            f"{cfg.env.max_episode_tokens}) exceeds rollout.max_model_len ({cfg.rollout.max_model_len}): "
            "every turn's prompt holds the episode so far; raise max_model_len or lower max_episode_tokens"
        )
    return problems


def _eval_problems(cfg: JobConfig) -> list[str]:
    """The eval section's rules, where `eval.prompts` turns it on."""
    ev = cfg.eval
    if ev.prompts is None:
        return []
    problems = []
    sampling = eval_sampling(ev, cfg.rollout.sampling)
    if sampling.temperature == 0 and ev.n_samples > 1:
        problems.append(
            f"eval.sampling.temperature 0 is greedy decoding, one completion per prompt, but eval.n_samples is "
            f"{ev.n_samples}: set n_samples to 1 or raise eval.sampling.temperature"
        )
    if 0 < sampling.temperature < 0.01:
        problems.append(f"eval.sampling.temperature {sampling.temperature:g} is below 0.01: use 0 or at least 0.01")
    if any(not s for s in sampling.stop):
        problems.append("eval.sampling.stop holds an empty string, which the engine refuses: remove it")
    if cfg.env.name is None and cfg.model.max_prompt_tokens + sampling.max_tokens > cfg.rollout.max_model_len:
        problems.append(
            f"model.max_prompt_tokens + eval.sampling.max_tokens ({cfg.model.max_prompt_tokens} + "
            f"{sampling.max_tokens}) exceeds rollout.max_model_len ({cfg.rollout.max_model_len}): raise max_model_len"
        )
    if ev.rules is not None and not ev.rules:
        problems.append("eval.rules is an empty list: give rules, or null to score with the run's reward")
    return problems


def _engine_rejects(rollout: RolloutConfig) -> list[str]:
    """Sampling settings vLLM's SamplingParams would refuse (or quietly change) in the worker, where
    the error would surface only once generation began."""
    sampling, problems = rollout.sampling, []
    if sampling.temperature == 0 and rollout.n_samples > 1:
        problems.append(
            f"rollout.sampling.temperature 0 is greedy decoding, which gives one completion per "
            f"prompt, but rollout.n_samples is {rollout.n_samples}: set n_samples to 1 or raise the "
            "temperature"
        )
    if 0 < sampling.temperature < 0.01:  # vLLM raises it to 0.01, and the learner would score at another one
        problems.append(
            f"rollout.sampling.temperature {sampling.temperature:g} is below 0.01, which vLLM "
            "samples at instead: use 0 (greedy) or at least 0.01"
        )
    if any(not s for s in sampling.stop):
        problems.append("rollout.sampling.stop holds an empty string, which the engine refuses: remove it")
    return problems


def to_yaml(cfg: JobConfig) -> str:
    """The resolved config, as a YAML file `load_config` reads back to the same tree."""
    return yaml.safe_dump(msgspec.to_builtins(cfg), sort_keys=False)


def explain(struct: type[Struct] = JobConfig, prefix: str = "", registered: dict[str, Any] | None = None) -> list[str]:
    """One line per leaf field: `dotted.path = default  # description`, for `rollout config --explain`.
    `registered`: the names a field may take, by dotted path, read from the registries that hold them
    (the packages this one may not import)."""
    registered = registered or {}
    lines = []
    for f in msgspec.inspect.type_info(struct).fields:
        kind, description = f.type, ""
        if isinstance(kind, msgspec.inspect.Metadata):
            description = (kind.extra_json_schema or {}).get("description", "")
            kind = kind.type
        path = prefix + f.name
        if isinstance(kind, msgspec.inspect.StructType):
            lines.extend(explain(kind.cls, path + ".", registered))
            continue
        if path in registered:
            description += f" Registered: {', '.join(registered[path])}."
        default = (
            f.default
            if f.default is not msgspec.NODEFAULT
            else (f.default_factory() if f.default_factory is not msgspec.NODEFAULT else "(required)")
        )
        lines.append(f"{path} = {msgspec.json.encode(msgspec.to_builtins(default)).decode()}  # {description}")
    return lines
