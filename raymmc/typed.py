"""Typed dataclass configs from plain dicts (YAML, JSON, CLI overrides): unknown keys and wrong
types are errors that name the key. Standard library only, so that every layer can use it."""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any


class ConfigError(ValueError):
    """A configuration key or value is wrong; the message names it."""


_YAML_TRUE = ("on", "yes", "y", "true")
_YAML_FALSE = ("off", "no", "n", "false")


def _coerce(tp: Any, value: Any, key: str, base: Any = None) -> Any:
    """Check/convert ``value`` to the annotated type ``tp``; a mapping for a nested config overrides ``base``."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return from_dict(tp, value, prefix=key + ".", base=base if isinstance(base, tp) else None)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, key, base)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError("; ".join(errors))
    if origin is typing.Literal:
        if isinstance(value, bool) and value not in args:
            # YAML 1.1 (PyYAML, --set) reads off/no/on/yes as booleans: give back the choice the user wrote.
            spellings = _YAML_TRUE if value else _YAML_FALSE
            named = [a for a in args if isinstance(a, str) and a.lower() in spellings]
            if len(named) == 1:
                return named[0]
        if value not in args:
            raise ConfigError(f"{key}: {value!r} is not one of {list(args)}")
        return value
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if origin is tuple:
        return tuple(value)
    if tp is typing.Any:
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float, str, bool) and not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
        raise ConfigError(f"{key}: expected {tp.__name__}, got {value!r}")
    return value


def _field_default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def from_dict(cls: type, data: dict[str, Any], prefix: str = "", base: Any = None) -> Any:
    """``cls`` from ``data``, over ``base`` (an instance of ``cls``) where given. A mapping for a nested config
    changes only the keys it names: the others keep the value the enclosing field would have had (``base``'s,
    or the field's own default), not the nested class's defaults. A field whose default differs from its class's
    (``field(default_factory=lambda: Inner(lr=1e-4))``) keeps that default under a partial override."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    unknown = set(data) - set(fields)
    if unknown:
        raise ConfigError(f"unknown config key(s) {', '.join(prefix + u for u in sorted(unknown))}; "
                          f"valid: {', '.join(prefix + n for n in sorted(fields))}")
    values = {}
    for k, v in data.items():
        inner = None
        if isinstance(v, dict):  # a nested config: what it overrides
            inner = getattr(base, k) if base is not None else _field_default(fields[k])
        values[k] = _coerce(hints[k], v, prefix + k, inner)
    return dataclasses.replace(base, **values) if base is not None else cls(**values)


