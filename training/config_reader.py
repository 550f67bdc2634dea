"""The one config reader: TOML files, `--set section.key=value` overrides, type-checked fields.

Every job config in prefloop (train, online, PPO, judge, round and schedule configs) is a frozen
dataclass, possibly with nested dataclass sections. This module turns plain data (a TOML table,
a saved `config.json`, a list of `--set` strings) into such a dataclass with one coercion that
checks each value against the field's declared type, so a typo or a wrong type is a
`ConfigError` naming the key before any work starts. Each config keeps its cross-field rules in
its own `__post_init__`.

The override grammar is the same everywhere: `key=value` for a top-level field and
`section.key=value` for a field of a nested section; the value is read as a TOML literal
(`0.1`, `true`, `["a", "b"]`), else kept as the bare string (`runs/x`, `zero2`).

It lives in `training/` because `training/` is the leaf every other package may import; it uses
the standard library only.

    python -c "from training.config_reader import parse_override; print(parse_override('a.b=1'))"
"""

from __future__ import annotations

import dataclasses
import functools
import json
import tomllib
import types
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal, get_args, get_origin


class ConfigError(ValueError):
    """A configuration that cannot run (unknown key, wrong type, inconsistent values).

    The base of every config error in prefloop (train, online, PPO, judge, round, schedule), so
    a command can catch one class and print the message.
    """


class SavableConfig:
    """`to_dict` and `save` for the frozen config dataclasses."""

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (tuples become lists, nested sections become dicts)."""
        return typing.cast(dict[str, Any],
                           json.loads(json.dumps(dataclasses.asdict(typing.cast(Any, self)))))

    def save(self, path: Path) -> None:
        """Write the resolved config as JSON."""
        path.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")


@functools.cache
def field_types(cls: type) -> dict[str, Any]:
    """The declared type of each field of the dataclass `cls` (resolved once per class)."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def coerce_value(expected: Any, value: Any, name: str, error: type[Exception] = ConfigError, *,
                 strip_lists: bool = True) -> Any:
    """Check (and lightly convert) `value` against the type `expected` of the field `name`.

    Supported types: bool, int, float (an int is accepted), str, `Literal[...]`, `X | None`,
    `tuple[str, ...]` / `tuple[float, ...]` / `tuple[int, ...]` (a list, or for strings a
    comma-separated string; `strip_lists` strips the items, which is wrong where spaces matter,
    such as stop strings) and nested config dataclasses (from a table).
    """
    origin = get_origin(expected)
    if origin is Literal:
        if value not in get_args(expected):
            raise error(f"{name} must be one of {get_args(expected)}, got {value!r}")
        return value
    if origin in (types.UnionType, typing.Union):
        members = [arg for arg in get_args(expected) if arg is not type(None)]
        if value is None:
            if len(members) == len(get_args(expected)):
                raise error(f"{name} must not be empty")
            return None
        if len(members) != 1:
            raise error(f"unsupported field type for {name}: {expected}")
        return coerce_value(members[0], value, name, error, strip_lists=strip_lists)
    if origin is tuple:
        item_type = get_args(expected)[0] if get_args(expected) else str
        if isinstance(value, str) and item_type is str:
            items = (v.strip() for v in value.split(",")) if strip_lists else value.split(",")
            value = [v for v in items if v]
        if not isinstance(value, list | tuple):
            raise error(f"{name} must be a list, got {value!r}")
        return tuple(coerce_value(item_type, item, f"{name}[{i}]", error, strip_lists=strip_lists)
                     for i, item in enumerate(value))
    if _is_dataclass_type(expected):
        if isinstance(value, expected):
            return value
        if not isinstance(value, Mapping):
            raise error(f"[{name}] must be a table, got {value!r}")
        return build(expected, value, error, what=f"[{name}]", strip_lists=strip_lists)
    if expected is Any:
        return value
    if expected is bool:
        if isinstance(value, bool):
            return value
        raise error(f"{name} must be true or false, got {value!r}")
    if expected is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise error(f"{name} must be an integer, got {value!r}")
    if expected is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        raise error(f"{name} must be a number, got {value!r}")
    if expected is str:
        if isinstance(value, str):
            return value
        raise error(f"{name} must be a string, got {value!r}")
    if origin is dict or expected is dict:
        if isinstance(value, Mapping):
            return dict(value)
        raise error(f"{name} must be a table, got {value!r}")
    raise error(f"unsupported field type for {name}: {expected}")


def coerce_field(cls: type, name: str, value: Any, error: type[Exception] = ConfigError, *,
                 strip_lists: bool = True) -> Any:
    """`coerce_value` for the field `name` of the dataclass `cls`; unknown names are errors."""
    known = field_types(cls)
    if name not in known:
        raise error(f"unknown config key {name!r}; known keys: {', '.join(sorted(known))}")
    return coerce_value(known[name], value, name, error, strip_lists=strip_lists)


def coerce_fields(cls: type, data: Mapping[str, Any], error: type[Exception] = ConfigError, *,
                  what: str = "config", strip_lists: bool = True) -> dict[str, Any]:
    """Type-checked keyword arguments for `cls` from the table `data` (nested tables recurse)."""
    if not isinstance(data, Mapping):
        raise error(f"{what} must be a table, got {data!r}")
    known = field_types(cls)
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise error(f"{what}: unknown keys {unknown}; known keys: {', '.join(sorted(known))}")
    return {key: coerce_value(known[key], value, key, error, strip_lists=strip_lists)
            for key, value in data.items()}


def build(cls: type, data: Mapping[str, Any], error: type[Exception] = ConfigError, *,
          what: str = "config", strip_lists: bool = True) -> Any:
    """An instance of the config dataclass `cls` from `data`, every value type-checked.

    `__post_init__` checks that raise `error` pass through; a TypeError from the constructor
    (a required field missing) becomes `error`.
    """
    values = coerce_fields(cls, data, error, what=what, strip_lists=strip_lists)
    try:
        return cls(**values)
    except TypeError as exc:
        raise error(f"{what}: {exc}") from None


def parse_override(item: str, error: type[Exception] = ConfigError) -> tuple[tuple[str, ...], Any]:
    """Parse one `--set` item: `key=value` or `section.key=value`.

    Returns the key path and the value read as a TOML literal, else the bare string.
    """
    key, sep, raw = item.partition("=")
    path = tuple(part.strip() for part in key.split("."))
    if not sep or not all(path):
        raise error(f"override {item!r} is not of the form key=value or section.key=value")
    raw = raw.strip()
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw  # bare strings such as paths, `zero2` or `rule:format`
    return path, value


def _declared_type(cls: type, path: tuple[str, ...]) -> Any:
    """The type of the field at `path` inside `cls` (None where the path names no field)."""
    current: Any = cls
    for part in path:
        if not _is_dataclass_type(current):
            return None
        current = field_types(current).get(part)
        if current is None:
            return None
    return current


def _is_str_field(tp: Any) -> bool:
    if tp is str:
        return True
    if get_origin(tp) in (types.UnionType, typing.Union):
        return str in get_args(tp)
    return False


def apply_overrides(data: Mapping[str, Any], overrides: Iterable[str], cls: type,
                    error: type[Exception] = ConfigError, *, max_depth: int = 2
                    ) -> dict[str, Any]:
    """`data` with each `--set` override applied (later wins); `data` itself is not changed.

    A value given for a string field stays the raw string (`model=123` is "123", not 123).
    Unknown keys are left for `build` to report with the list of known keys.
    """
    result: dict[str, Any] = {k: (dict(v) if isinstance(v, Mapping) else v)
                              for k, v in data.items()}
    for item in overrides:
        path, value = parse_override(item, error)
        if len(path) > max_depth:
            raise error(f"--set {'.'.join(path)}: at most {max_depth - 1} section level(s)")
        if _is_str_field(_declared_type(cls, path)) and not isinstance(value, str):
            value = item.partition("=")[2].strip()
        target = result
        for part in path[:-1]:
            section = target.get(part)
            if section is None:
                section = {}
            elif not isinstance(section, Mapping):
                raise error(f"--set {'.'.join(path)}: {part} is not a section")
            target[part] = section = dict(section)
            target = section
        target[path[-1]] = value
    return result


def read_toml(path: Path, error: type[Exception] = ConfigError) -> dict[str, Any]:
    """A TOML config file; a missing or unreadable file is a config error, not a crash."""
    try:
        return tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise error(f"config file {path} does not exist") from None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as err:
        raise error(f"{path}: {err}") from None


def resolve_fields(cls: type, files: Iterable[Path], overrides: Iterable[str],
                   error: type[Exception] = ConfigError, *, strip_lists: bool = True,
                   pin: tuple[str, str, str] | None = None) -> dict[str, Any]:
    """Type-checked field values of a flat `cls` from TOML `files` then overrides (later wins).

    pin: (key, value, what fixes it), e.g. ("mode", "dpo", "the command"): a layer that sets
    `key` to another value is an error, and the result always holds key=value.
    """
    layers = [read_toml(path, error) for path in files]
    layers.append(apply_overrides({}, overrides, cls, error, max_depth=1))
    values: dict[str, Any] = {}
    for layer in layers:
        for key, value in layer.items():
            if pin is not None and key == pin[0] and value != pin[1]:
                raise error(f"config says {key}={value!r} but {pin[2]} is {pin[1]!r}")
            values[key] = coerce_field(cls, key, value, error, strip_lists=strip_lists)
    if pin is not None:
        values[pin[0]] = pin[1]
    return values


__all__ = ["ConfigError", "SavableConfig", "apply_overrides", "build", "coerce_field",
           "coerce_fields", "coerce_value", "field_types", "parse_override", "read_toml",
           "resolve_fields"]
