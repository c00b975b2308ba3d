"""One registry for every pluggable kind: advantage estimators, losses, reward rules and sources,
environments, data sources.

A kind's registry is a `Registry`, made once in the module that holds the kind's built-ins; each
built-in adds itself with the registry's decorator where it is defined,

    ESTIMATORS = Registry("advantage estimator", "learner.estimator")

    @ESTIMATORS.register("gae", needs_critic=True)
    def gae(...): ...

with optional attributes that travel with the entry (`ESTIMATORS.entry("gae").attributes`). A name
registered twice fails when the second module is imported. `lookup` finds the entry a config names:
an unknown name raises `ConfigError` (a `UserError`) naming the config field and every known name.

A kind that takes users' own entries (reward rules, environments) reads a name `package.module:name`
as one: `import_entry` is the one place such a name is imported, with `importlib` and `getattr` (no
configured text is ever evaluated as code), and the registry's `adapt_user` checks what it found.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from contracts.config import ConfigError

T = TypeVar("T")

USER_SEPARATOR = ":"


def is_user_entry(name: str) -> bool:
    """Whether `name` names a user's own object (`package.module:name`) rather than a built-in."""
    return USER_SEPARATOR in name


def import_entry(name: str, field: str, form: str = "package.module:name") -> object:
    """The object `package.module:name` points at, its module imported by name.

    ConfigError naming `field` when `name` is not Python names around one colon (`form` says what was
    expected), the module does not import or raises while importing, or it has no such attribute."""
    module_name, _, attribute = name.partition(USER_SEPARATOR)
    if not (all(part.isidentifier() for part in module_name.split(".")) and attribute.isidentifier()):
        raise ConfigError(f"{field}: {name!r} is not {form} (Python names, one colon)")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ConfigError(
            f"{field}: {name}: cannot import {module_name} ({e}); is it installed on every node?"
        ) from None
    except Exception as e:  # noqa: BLE001 - a module that raises while importing is a config problem too
        raise ConfigError(f"{field}: {name}: importing {module_name} raised {type(e).__name__}: {e}") from None
    if not hasattr(module, attribute):
        raise ConfigError(f"{field}: {name}: module {module_name} has no {attribute!r}")
    return getattr(module, attribute)


@dataclass(frozen=True)
class Entry(Generic[T]):
    """One registered object, with the attributes it was registered with (empty for a user's own)."""

    name: str
    value: T
    attributes: Mapping[str, Any]


class Registry(Mapping[str, T]):
    """The built-ins of one kind by name, in the order they were registered, and the config field
    that names them.

    `kind` is what an entry is called in messages ("reward rule"); `field` the config field that names
    one ("reward.rules[].name"). `modules` hold built-ins that register themselves when imported and
    import this registry's module in turn; they are imported on the first read. `user_form` (e.g.
    "package.module:function") lets the field name a user's own object: `lookup` imports it and
    passes it through `adapt_user(name, obj, field)`, which checks it and returns the entry.

    As a `Mapping` it reads the built-ins (`name in registry`, `registry[name]`, iteration in order).
    """

    def __init__(
        self,
        kind: str,
        field: str,
        *,
        modules: tuple[str, ...] = (),
        user_form: str | None = None,
        adapt_user: Callable[[str, Any, str], T] | None = None,
    ):
        if adapt_user is not None and user_form is None:
            raise ValueError(f"{kind} registry: adapt_user needs the user_form it reads")
        self.kind = kind
        self.field = field
        self.user_form = user_form
        self._modules = modules
        self._adapt_user = adapt_user
        self._entries: dict[str, Entry[T]] = {}
        self._modules_imported = not modules

    def register(self, name: str, **attributes: Any) -> Callable[[T], T]:
        """Decorator: adds the decorated object as `name`, with `attributes`, and returns it unchanged.
        ValueError when `name` already names another object: two built-ins cannot share a name."""

        def add(value: T) -> T:
            held = self._entries.get(name)
            if held is not None and held.value is not value:
                raise ValueError(
                    f"{self.kind} {name!r} is registered twice: {_qualified(held.value)} and {_qualified(value)}"
                )
            self._entries[name] = Entry(name, value, dict(attributes))
            return value

        return add

    def names(self) -> tuple[str, ...]:
        """The built-ins' names, in the order they were registered."""
        return tuple(self._built_ins())

    def listing(self) -> str:
        """The known names as a message lists them, users' own form last where the field takes them."""
        own = f", or your own as {self.user_form}" if self.user_form else ""
        return (", ".join(self.names()) or "(none)") + own

    def entry(self, name: str, *, field: str | None = None) -> Entry[T]:
        """The entry `name` names: a built-in, or a user's own imported and adapted. ConfigError naming
        `field` (default: the registry's; pass the exact one, such as `reward.rules.2.name`, where a
        list holds several) and the known names when there is none."""
        where = field or self.field
        if self._adapt_user is not None and is_user_entry(name):
            return Entry(name, self._adapt_user(name, import_entry(name, where, self.user_form), where), {})
        built_ins = self._built_ins()
        if name not in built_ins:
            raise ConfigError(f"{where}: unknown {self.kind} {name!r}; known: {self.listing()}")
        return built_ins[name]

    def lookup(self, name: str, *, field: str | None = None) -> T:
        """The object `name` names; see `entry` for the errors."""
        return self.entry(name, field=field).value

    def __getitem__(self, name: str) -> T:
        return self._built_ins()[name].value

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._built_ins())

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {self.field!r}: {', '.join(self._entries)})"

    def _built_ins(self) -> dict[str, Entry[T]]:
        if not self._modules_imported:
            self._modules_imported = True  # before importing: those modules import this registry's
            try:
                for module in self._modules:
                    importlib.import_module(module)
            except BaseException:
                self._modules_imported = False  # the next read tries again and raises the same
                raise
        return self._entries


def _qualified(value: object) -> str:
    """Where an object was defined, for the message of a name registered twice."""
    return f"{getattr(value, '__module__', '?')}.{getattr(value, '__qualname__', type(value).__qualname__)}"
