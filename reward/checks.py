"""The `reward` section checked at start-up, before Ray starts: what needs reward code to check.

`check_reward_config` is the one call `rollout run` / `rollout generate` make (next to the config's
cross-field `check`): every rule name resolves (a built-in of `reward.rules.RULES`, the one registry
of them, or a user's `package.module:function` that imports and can be called as a rule), every
rule's params fit it, no rule takes a name kept for something else, a local reward model
directory holds a one-label sequence classifier, and a reward server has an http(s) URL. A bad
config fails here in seconds with a `ConfigError` naming the field, rather than in a reward worker
on a remote node.
"""

from __future__ import annotations

import json
from pathlib import Path

from contracts.config import ConfigError, RewardConfig
from reward.remote import REMOTE_COMPONENT, check_url
from reward.rule_params import check_params
from reward.rules import RULES
from reward.scorer import rule_component_names
from reward.sources import MODEL_COMPONENT
from reward.worker import RESTARTED

# Names a rule's component may not take: the archive's struct holds each name once, and the worker's
# latency figures (`total`, `restarted`) share a dict with the rules'.
RESERVED = {
    MODEL_COMPONENT: "the reward model's component",
    REMOTE_COMPONENT: "the reward server's component",
    "total": "the reward worker's whole-call latency",
    RESTARTED: "the reward worker's restart count",
}


def check_reward_config(cfg: RewardConfig) -> None:
    """Raises ConfigError naming each bad field (`reward.rules.N.name: ...`) and what to change."""
    problems = [*rule_problems(cfg), *model_problems(cfg), *remote_problems(cfg)]
    if problems:
        raise ConfigError(
            problems[0] if len(problems) == 1 else "the config needs changes:\n  - " + "\n  - ".join(problems)
        )


def rule_problems(cfg: RewardConfig) -> list[str]:
    """One line per bad rule, naming its field; importing a user rule's module is part of the check."""
    problems = []
    for i, spec in enumerate(cfg.rules):
        try:
            rule = RULES.lookup(spec.name, field=f"reward.rules.{i}.name")
        except ConfigError as e:
            problems.append(str(e))
            continue
        try:
            check_params(spec.name, rule, spec.params)
        except ValueError as e:
            problems.append(f"reward.rules.{i}.params: {e}")
    for i, (spec, component) in enumerate(zip(cfg.rules, rule_component_names(cfg.rules))):
        if component in RESERVED:
            problems.append(
                f"reward.rules.{i}.name: {spec.name} would score into the component {component!r}, "
                f"a name kept for {RESERVED[component]}; rename the function"
            )
    return problems


def remote_problems(cfg: RewardConfig) -> list[str]:
    """A reward server needs an http(s) URL, and a time-out a stall watch would not mistake for a hang."""
    if cfg.remote is None:
        return []
    problems = []
    problem = check_url(cfg.remote.url)
    if problem:
        problems.append(f"reward.remote.url: {problem}")
    if cfg.remote.timeout_s >= cfg.stall_timeout_s:
        problems.append(
            f"reward.remote.timeout_s ({cfg.remote.timeout_s:g}) is not below reward.stall_timeout_s "
            f"({cfg.stall_timeout_s:g}): a worker waiting on one slow request would be killed as stalled; "
            "lower timeout_s or raise stall_timeout_s"
        )
    return problems


def model_problems(cfg: RewardConfig) -> list[str]:
    """A reward model given as a local path must be a saved one-label classifier there."""
    if cfg.model is None:
        return []
    path = Path(cfg.model.path).expanduser()
    looks_local = cfg.model.path.startswith(("/", ".", "~")) or path.exists() or cfg.model.path.count("/") != 1
    if not looks_local:  # a hub id, fetched by the worker
        return []
    if not (path / "config.json").is_file():
        what = "does not exist" if not path.exists() else "holds no config.json (not a saved model)"
        return [
            f"reward.model.path: {cfg.model.path} {what}; point it at the model directory "
            "`reward train` wrote (OUT/model)"
        ]
    config = json.loads((path / "config.json").read_text())
    architectures = config.get("architectures") or []
    labels = len(config.get("id2label") or {0: "score"})
    if not any(a.endswith("ForSequenceClassification") for a in architectures) or labels != 1:
        return [
            f"reward.model.path: {cfg.model.path} holds {', '.join(architectures) or 'a model'} with "
            f"{labels} label(s), not a reward model (a sequence-classification head with one label, "
            "as `reward train` writes); a policy or causal LM cannot score"
        ]
    return []
