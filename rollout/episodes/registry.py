"""Environments by name: the built-ins registered here, a user's class loaded from `package.module:ClassName`.

`environment_class(name)` is what the rollout worker calls to find `env.name`'s class; `check_environment`
is the start-up check (`rollout.driver.startup.read_data`, before Ray starts): the name resolves to a
subclass of `contracts.environment.Environment` and one instance can be made with `env.params`, so a bad
name or params fails in seconds with a `ConfigError` naming the setting, not in a worker on a remote node.
Names are resolved with `importlib` and `getattr`: no configured text is ever evaluated as code.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

from contracts.config import ConfigError, EnvConfig
from contracts.environment import Environment

SEPARATOR = ":"

ENVIRONMENTS: dict[str, type[Environment]] = {}

# The modules holding the built-ins; imported on the first lookup, which registers them.
BUILTIN_MODULES = ("rollout.episodes.calculator", "rollout.episodes.conversation")


def register_environment(name: str) -> Callable[[type[Environment]], type[Environment]]:
    """Class decorator: registers an `Environment` subclass as the built-in `name` and returns it."""

    def register(cls: type[Environment]) -> type[Environment]:
        if name in ENVIRONMENTS and ENVIRONMENTS[name] is not cls:
            raise ValueError(f"environment {name!r} is registered twice ({ENVIRONMENTS[name].__qualname__})")
        ENVIRONMENTS[name] = cls
        return cls

    return register


def builtin_environments() -> dict[str, type[Environment]]:
    """Every built-in environment by name, their modules imported first so that they are registered."""
    for module in BUILTIN_MODULES:
        importlib.import_module(module)
    return ENVIRONMENTS


def environment_class(name: str) -> type[Environment]:
    """The environment class `name` names: a built-in, or a user's `package.module:ClassName`.

    Raises ConfigError naming `env.name` when the name is unknown, its module does not import, it has
    no such attribute, or the attribute is not a subclass of Environment with callable reset and step.
    """
    if SEPARATOR in name:
        return _checked(name, _user_class(name))
    known = builtin_environments()
    if name not in known:
        raise ConfigError(
            f"env.name: unknown environment {name!r}; the built-ins are {', '.join(sorted(known))}, "
            "or your own as package.module:ClassName"
        )
    return known[name]


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


def _user_class(name: str) -> object:
    """The attribute `package.module:ClassName` points at, its module imported by name."""
    module_name, _, attribute = name.partition(SEPARATOR)
    if not (all(part.isidentifier() for part in module_name.split(".")) and attribute.isidentifier()):
        raise ConfigError(f"env.name: {name!r} is not package.module:ClassName (Python names, one colon)")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ConfigError(
            f"env.name: {name}: cannot import {module_name} ({e}); is it installed on every node?"
        ) from None
    except Exception as e:  # noqa: BLE001 - a module that raises while importing is a config problem too
        raise ConfigError(f"env.name: {name}: importing {module_name} raised {type(e).__name__}: {e}") from None
    if not hasattr(module, attribute):
        raise ConfigError(f"env.name: {name}: module {module_name} has no {attribute!r}")
    return getattr(module, attribute)


def _checked(name: str, cls: object) -> type[Environment]:
    """`cls` when it keeps the contract: a subclass of Environment with callable reset and step, and a
    step of its own (the base's only raises NotImplementedError, which would fail every episode)."""
    if not isinstance(cls, type):
        raise ConfigError(f"env.name: {name} is not a class but an object of type {type(cls).__name__}")
    if not issubclass(cls, Environment):
        raise ConfigError(
            f"env.name: {name} is not a subclass of contracts.environment.Environment; derive your class from it"
        )
    for method in ("opening", "reset", "step"):
        if not callable(getattr(cls, method, None)):
            raise ConfigError(f"env.name: {name}.{method} is not callable; the Environment contract needs it")
    if cls.step is Environment.step:
        raise ConfigError(f"env.name: {name} does not define step(text), which every environment needs")
    return cls
