"""Frozen dataclass configs that serialize to plain dicts and back.

Every config is a frozen dataclass deriving from :class:`Config`. ``to_dict`` writes its fields plus
``type`` and ``version``; ``from_dict`` reads them back and rejects unknown keys by name, so the same
schema drives Python, CLI flags and YAML recipes. Nested configs are rebuilt from their field's type.
This module knows nothing about quantization; the configs live next to the code that uses them.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, ClassVar, TypeVar

from quantdeploy.errors import ConfigError

C = TypeVar("C", bound="Config")

_REGISTRY: dict[str, type[Config]] = {}


@dataclasses.dataclass(frozen=True)
class Config:
    """Base of all configs. Subclasses set ``TYPE`` (a unique name) and ``VERSION``."""

    TYPE: ClassVar[str] = "config"
    VERSION: ClassVar[int] = 1

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "TYPE" in cls.__dict__:
            _REGISTRY[cls.TYPE] = cls

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise :class:`ConfigError` if the field values do not make sense together."""

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"type": self.TYPE, "version": self.VERSION}
        for f in dataclasses.fields(self):
            out[f.name] = _encode(getattr(self, f.name))
        return out

    @classmethod
    def from_dict(cls: type[C], data: dict[str, Any]) -> C:
        if not isinstance(data, dict):
            raise ConfigError(f"{cls.TYPE} config must be a mapping, got {type(data).__name__}")
        data = dict(data)
        kind = data.pop("type", cls.TYPE)
        if kind != cls.TYPE:
            raise ConfigError(f"expected a '{cls.TYPE}' config, got type '{kind}'")
        version = data.pop("version", cls.VERSION)
        if not isinstance(version, int) or version > cls.VERSION:
            raise ConfigError(
                f"{cls.TYPE} config version {version} is newer than this quantdeploy understands "
                f"({cls.VERSION}); upgrade quantdeploy"
            )
        if version < cls.VERSION:
            data = cls.upgrade(data, version)
        hints = typing.get_type_hints(cls)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ConfigError(
                f"unknown key '{unknown[0]}' in {cls.TYPE} config; valid keys: {', '.join(sorted(names))}"
            )
        kwargs = {k: _decode(hints[k], v, f"{cls.TYPE}.{k}") for k, v in data.items()}
        try:
            return cls(**kwargs)
        except TypeError as err:  # a missing required field
            raise ConfigError(f"{cls.TYPE} config: {err}") from None

    @classmethod
    def upgrade(cls, data: dict[str, Any], version: int) -> dict[str, Any]:
        """The fields of a dict written at an older ``version``, as this version reads them (default: as is)."""
        return data

    def replace(self: C, **changes: Any) -> C:
        return dataclasses.replace(self, **changes)


def config_from_dict(data: dict[str, Any]) -> Config:
    """Rebuild any registered config from its dict, choosing the class by ``type``."""
    kind = data.get("type") if isinstance(data, dict) else None
    if kind not in _REGISTRY:
        raise ConfigError(f"unknown config type {kind!r}; known: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[kind].from_dict(data)


def _encode(value: Any) -> Any:
    if isinstance(value, Config):
        return value.to_dict()
    if isinstance(value, tuple):
        return [_encode(v) for v in value]
    return value


def _decode(hint: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:
            return _decode(inner[0], value, where)
        choices = [a for a in inner if isinstance(a, type) and issubclass(a, Config)]
        if choices and isinstance(value, dict):  # a union of configs: choose by the "type" key
            allowed = {c.TYPE: c for c in choices}
            if value.get("type") not in allowed:
                raise ConfigError(f"{where} must have type {' or '.join(allowed)}, got {value.get('type')!r}")
            return allowed[value["type"]].from_dict(value)
        return value
    if isinstance(hint, type) and issubclass(hint, Config):
        return hint.from_dict(value)
    if origin is tuple:  # items decoded by their own hints: nested configs come back as configs
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where} must be a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_decode(args[0], v, f"{where}[{i}]") for i, v in enumerate(value))
        if not args:  # a bare tuple: items as given
            return tuple(value)
        if len(args) != len(value):
            raise ConfigError(f"{where} must have {len(args)} items, got {len(value)}")
        return tuple(_decode(a, v, f"{where}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    if hint is bool and not isinstance(value, bool):
        raise ConfigError(f"{where} must be true or false, got {value!r}")
    if hint is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigError(f"{where} must be an integer, got {value!r}")
    if hint is float and not isinstance(value, (int, float)):
        raise ConfigError(f"{where} must be a number, got {value!r}")
    if hint is str and not isinstance(value, str):
        raise ConfigError(f"{where} must be a string, got {value!r}")
    return value
