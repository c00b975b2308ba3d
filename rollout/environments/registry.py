"""Environments by name: the built-ins registered here, a user's class loaded from `package.module:ClassName`.

`ENVIRONMENTS` is their registry (`contracts.registry`): a built-in adds itself with
`@ENVIRONMENTS.register(name)`, and `ENVIRONMENTS.lookup(env.name)` gives a built-in or imports a user's
class and checks it keeps the contract. `check_environment` is the start-up check
(`rollout.driver.startup.read_data`, before Ray starts): the name resolves to a subclass of
`contracts.environment.Environment` and one instance can be made with `env.params`, so a bad name or
params fails in seconds with a `ConfigError` naming the setting, not in a worker on a remote node.
"""

from __future__ import annotations

from contracts.config import ConfigError, EnvConfig
from contracts.environment import Environment
from contracts.registry import Registry


def _checked(name: str, cls: object, field: str) -> type[Environment]:
    """`cls` when it keeps the contract: a subclass of Environment with callable reset and step, and a
    step of its own (the base's only raises NotImplementedError, which would fail every episode)."""
    if not isinstance(cls, type):
        raise ConfigError(f"{field}: {name} is not a class but an object of type {type(cls).__name__}")
    if not issubclass(cls, Environment):
        raise ConfigError(
            f"{field}: {name} is not a subclass of contracts.environment.Environment; derive your class from it"
        )
    for method in ("opening", "reset", "step"):
        if not callable(getattr(cls, method, None)):
            raise ConfigError(f"{field}: {name}.{method} is not callable; the Environment contract needs it")
    if cls.step is Environment.step:
        raise ConfigError(f"{field}: {name} does not define step(text), which every environment needs")
    return cls


# The built-ins live in the modules named here, which import this one to register themselves.
ENVIRONMENTS: Registry[type[Environment]] = Registry(
    "environment",
    "env.name",
    modules=(
        "rollout.environments.calculator",
        "rollout.environments.conversation",
        "rollout.environments.openai_agent",
        "rollout.environments.reasoning_gym",
    ),
    user_form="package.module:ClassName",
    adapt_user=_checked,
)


def environment_class(name: str) -> type[Environment]:
    """The environment class `name` names (what the rollout worker calls with `env.name`); ConfigError
    naming `env.name` when there is none or a user's class does not keep the contract."""
    return ENVIRONMENTS.lookup(name)


def check_environment(cfg: EnvConfig) -> type[Environment] | None:
    """The class of `cfg.name` with one instance made from `cfg.params`, so that bad params fail at start;
    None for single-turn rollouts (`cfg.name` null). ConfigError naming `env.name` or `env.params`."""
    if cfg.name is None:
        return None
    cls = environment_class(cfg.name)
    try:
        cls(**cfg.params)
    except (TypeError, ValueError) as e:  # what the constructors raise for params they do not take
        raise ConfigError(f"env.params: {cfg.name}: {e}") from None
    except Exception as e:  # noqa: BLE001 - a user's constructor that fails otherwise is a config problem too
        raise ConfigError(f"env.params: {cfg.name}: making one raised {type(e).__name__}: {e}") from None
    return cls
