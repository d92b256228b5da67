"""YAML configs loaded into typed dataclasses, with dotted CLI overrides (``train.lr=1e-4``).

Every key is checked against the dataclass: an unknown key or a value of the wrong type is an error that names
the key and the file, so a typo can never silently fall back to a default.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import yaml

from mmwb.errors import MmwbConfigError

T = TypeVar("T")


def load_config(cls: type[T], path: str | Path | None = None, overrides: Iterable[str] = ()) -> T:
    """Build ``cls`` from the YAML file at ``path`` (optional) with ``overrides`` applied on top, in order."""
    source = str(path) if path is not None else "<defaults>"
    data: dict[str, Any] = _read_yaml(Path(path)) if path is not None else {}
    for override in overrides:
        _apply_override(data, override)
    return from_dict(cls, data, source=source)


def from_dict(cls: type[T], data: Mapping[str, Any], source: str = "<dict>", prefix: str = "") -> T:
    """Convert a nested mapping into dataclass ``cls``, checking every key and value type."""
    if not isinstance(data, Mapping):
        where = prefix.rstrip(".") or "the config"
        raise MmwbConfigError(f"{source}: {where} must be a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    hints = typing.get_type_hints(cls)
    unknown = [key for key in data if key not in fields]
    if unknown:
        key = unknown[0]
        close = difflib.get_close_matches(str(key), fields, n=1)
        hint = f" (did you mean '{prefix}{close[0]}'?)" if close else f" (known keys: {', '.join(fields)})"
        raise MmwbConfigError(f"{source}: unknown config key '{prefix}{key}'{hint}")
    kwargs = {key: _convert(hints[key], value, source, f"{prefix}{key}") for key, value in data.items()}
    return cls(**kwargs)


def to_dict(config: Any) -> dict[str, Any]:
    """The plain-data form of a config dataclass, for JSON sidecars and checkpoint metadata."""
    return dataclasses.asdict(config)


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise MmwbConfigError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise MmwbConfigError(f"{path}: not valid YAML: {err}") from err
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise MmwbConfigError(f"{path}: the top level must be a mapping of keys to values")
    return data


def _apply_override(data: dict[str, Any], override: str) -> None:
    key, sep, raw = override.partition("=")
    if not sep or not key.strip():
        raise MmwbConfigError(f"override {override!r}: expected KEY=VALUE, e.g. train.lr=1e-4")
    *parents, leaf = key.strip().split(".")
    node = data
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise MmwbConfigError(f"override {override!r}: {part!r} is not a section")
    node[leaf] = yaml.safe_load(raw) if raw.strip() else ""


def _convert(hint: Any, value: Any, source: str, key: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _convert(arg, value, source, key)
            except MmwbConfigError as err:
                errors.append(err)
        raise errors[0]
    if origin is typing.Literal:
        if value not in args:
            raise MmwbConfigError(
                f"{source}: {key} must be one of {', '.join(map(repr, args))}, got {value!r}"
            )
        return value
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, source=source, prefix=f"{key}.")
    if origin in (list, tuple):
        if not isinstance(value, list | tuple):
            raise _type_error(source, key, "a list", value)
        item = args[0] if args else Any
        items = [_convert(item, v, source, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, Mapping):
            raise _type_error(source, key, "a mapping", value)
        if len(args) != 2:
            return dict(value)
        return {
            _convert(args[0], k, source, key): _convert(args[1], v, source, f"{key}.{k}")
            for k, v in value.items()
        }
    return _convert_scalar(hint, value, source, key)


def _convert_scalar(hint: Any, value: Any, source: str, key: str) -> Any:
    if hint is float:
        number = _as_float(value)
        if number is not None and not math.isfinite(number):
            raise MmwbConfigError(f"{source}: {key} must be a finite number, got {value!r}")
        if number is not None:
            return number
    if hint is Path and isinstance(value, str):
        return Path(value)
    if hint is int and isinstance(value, bool):
        raise _type_error(source, key, "an integer", value)
    if isinstance(hint, type) and isinstance(value, hint):
        return value
    raise _type_error(source, key, _describe(hint), value)


def _as_float(value: Any) -> float | None:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        try:  # PyYAML reads "1e-4" (no dot) as a string
            return float(value)
        except ValueError:
            return None
    return None


def _describe(hint: Any) -> str:
    names = {int: "an integer", float: "a number", str: "a string", bool: "true or false", Path: "a path"}
    return names.get(hint, getattr(hint, "__name__", str(hint)))


def _type_error(source: str, key: str, expected: str, value: Any) -> MmwbConfigError:
    return MmwbConfigError(f"{source}: {key} must be {expected}, got {value!r} ({type(value).__name__})")
