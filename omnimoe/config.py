"""Typed dataclass configs: build from dicts / YAML files, apply dotted overrides, dump back.

Every config in omnimoe is a plain ``@dataclass``. This module turns untrusted input (a YAML file, a JSON
``config.json``, ``key.sub=value`` strings from the command line) into those dataclasses and says exactly
which key is wrong when it cannot.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A config value or key is invalid; the message names the dotted key."""


def _check_value(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _check_value(value, arg, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{key}: {value!r} matches none of {args}")
    if origin is typing.Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{key}: {value!r} is not one of {list(choices)}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__} {value!r}")
        (inner, *_) = typing.get_args(tp) or (Any,)
        items = [_check_value(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping for {tp.__name__}, got {value!r}")
        return from_dict(tp, value, prefix=f"{key}.")
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "3e-4" as a string
            try:
                return float(value)
            except ValueError:
                raise ConfigError(f"{key}: expected a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    return value


_INTERVAL = re.compile(r"^([\[(])\s*(-?inf|[-+0-9.e]+)\s*,\s*(-?inf|[-+0-9.e]+)\s*([\])])$")


def check_ranges(cfg: Any, ranges: dict[str, str]) -> None:
    """Raise :class:`ConfigError` naming the first field of ``cfg`` outside its interval: ``ranges`` maps
    field names to intervals such as ``"[1, inf)"`` or ``"(0, 1]"``. NaN and infinities never pass; None
    (an optional value left unset) does; a list is checked item by item. Called from ``__post_init__``, so
    a config built in Python is checked like one read from YAML or ``--set``."""
    for name, spec in ranges.items():
        match = _INTERVAL.match(spec)
        if match is None:
            raise ValueError(f"bad interval {spec!r} for {name}")
        left, lo, hi, right = match.group(1), float(match.group(2)), float(match.group(3)), match.group(4)
        value = getattr(cfg, name)
        for v in value if isinstance(value, (list, tuple)) else [value]:
            if v is None or isinstance(v, bool) or not isinstance(v, (int, float)):
                continue  # types are checked where the config is read
            ok = math.isfinite(v) and (v >= lo if left == "[" else v > lo) and (v <= hi if right == "]" else v < hi)
            if not ok:
                raise ConfigError(f"{name}: {v!r} is outside the allowed range {spec}")


def from_dict(cls: type[T], data: dict[str, Any], prefix: str = "") -> T:
    """Build dataclass ``cls`` from ``data``, checking names and types. Unknown keys are an error."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or cls.__name__}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    data = _move_legacy_keys(cls, data, prefix)
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            f"unknown config key(s) {', '.join(prefix + k for k in unknown)} for {cls.__name__}; "
            f"known: {', '.join(sorted(fields))}"
        )
    kwargs = {name: _check_value(value, hints[name], prefix + name) for name, value in data.items()}
    try:
        return cls(**kwargs)
    except TypeError as exc:  # a required field is missing
        raise ConfigError(f"{cls.__name__}: {exc}") from None
    except ConfigError as exc:  # a value out of range, named by its dotted key
        raise ConfigError(f"{prefix}{exc}") from None


def _move_legacy_keys(cls: type, data: dict[str, Any], prefix: str) -> dict[str, Any]:
    """Keys a config class has moved into a section (its ``legacy_keys``: key -> section) are read there."""
    moved = {k: section for k, section in getattr(cls, "legacy_keys", {}).items() if k in data}
    if not moved:
        return data
    data = dict(data)
    for key, section in moved.items():
        node = data.get(section)
        node = dict(node) if isinstance(node, dict) else {}
        if key in node:
            raise ConfigError(f"{prefix}{key} and {prefix}{section}.{key} are both given: keep {section}.{key}")
        node[key] = data.pop(key)
        data[section] = node
    return data


def to_dict(cfg: Any) -> dict[str, Any]:
    """A JSON/YAML-ready dict of a dataclass config (tuples become lists)."""
    return dataclasses.asdict(cfg)


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` strings to a nested dict (values parsed as YAML scalars)."""
    data = dict(data)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key.sub=value")
        dotted, raw = item.split("=", 1)
        keys = dotted.strip().split(".")
        if not all(keys):
            raise ConfigError(f"override {item!r} has an empty key")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as exc:
            raise ConfigError(f"override {item!r}: cannot parse value: {exc}") from None
        node = data
        for k in keys[:-1]:
            child = node.get(k)
            child = dict(child) if isinstance(child, dict) else {}
            node[k] = child
            node = child
        node[keys[-1]] = value
    return data


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None) -> T:
    """Load ``cls`` from a YAML (or JSON) file, then apply dotted overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            loaded = yaml.safe_load(path.read_text())
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {path}: top level must be a mapping")
        data = loaded
    data = apply_overrides(data, overrides or [])
    return from_dict(cls, data)
