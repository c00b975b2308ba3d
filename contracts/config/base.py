"""The base of every config section, its field metadata and the error a bad config raises."""

from __future__ import annotations

from typing import Any

from msgspec import Meta, Struct

from contracts.errors import UserError


class ConfigError(UserError, ValueError):
    """A config file, override or cross-field rule is wrong; the message says what to change."""


def doc(text: str, **constraints: Any) -> Meta:
    """Field metadata: the description shown by `rollout config --explain`, plus constraints."""
    return Meta(description=text, **constraints)


class Base(Struct, kw_only=True, forbid_unknown_fields=True, omit_defaults=False):
    pass
