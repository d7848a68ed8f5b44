"""The config machinery every section shares: errors that name the key, rule checks, and the
typed conversion between YAML mappings and frozen dataclasses (``from_dict`` / ``to_dict``)."""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from pathlib import Path
from typing import Any, Mapping, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration value or key is invalid; the message names where it came from."""


def _need(ok: bool, key: str, rule: str, value: Any) -> None:
    """ConfigError ``key: rule, got value`` unless ``ok``."""
    if not ok:
        raise ConfigError(f"{key}: {rule}, got {value!r}")


def _nonneg(section: str, obj: Any, *names: str) -> None:
    """Each named field a finite number >= 0 (NaN and inf refused)."""
    for name in names:
        v = getattr(obj, name)
        _need(isinstance(v, (int, float)) and math.isfinite(v) and v >= 0,
              f"{section}.{name}", "must be a finite number >= 0", v)


def _one_of(key: str, value: str, known: tuple[str, ...]) -> None:
    _need(value in known, key, f"must be one of {list(known)}", value)


def _coerce(tp: Any, value: Any, where: str) -> Any:
    """Convert a YAML value to the annotated type (recursing into dataclasses and tuples)."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):  # already built (replace() with dataclass items, e.g. sites)
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__}")
        return from_dict(tp, value, where)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise ConfigError(f"{where}: may not be null")
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"{where}: invalid value {value!r}")
    if origin is tuple:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            value = [value]  # one number is a list of one (--set sim.seeds=8)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (item_tp, *_rest) = typing.get_args(tp) or (Any,)
        return tuple(_coerce(item_tp, v, f"{where}[{i}]") for i, v in enumerate(value))
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in {"true", "false", "yes", "no", "1", "0"}:
            return value.lower() in {"true", "yes", "1"}
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        try:
            return int(value)
        except ValueError as exc:
            raise ConfigError(f"{where}: expected an integer, got {value!r}") from exc
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{where}: expected a number, got {value!r}") from exc
    if tp is str:
        if not isinstance(value, (str, int, float)):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return str(value)
    return value


def from_dict(cls: type[T], data: Mapping[str, Any] | None, where: str = "config") -> T:
    """Build dataclass ``cls`` from a mapping; unknown keys raise ``ConfigError`` naming ``where``."""
    data = dict(data or {})
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; known: {sorted(names)}")
    kwargs = {k: _coerce(hints[k], v, f"{where}.{k}") for k, v in data.items()}
    return cls(**kwargs)


def to_dict(obj: Any) -> dict[str, Any]:
    """Plain, YAML-safe dict of a (nested) config dataclass; tuples become lists."""

    def plain(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        return v

    return plain(obj)


def replace(obj: T, **changes: Any) -> T:
    """``dataclasses.replace`` that also accepts dotted keys: replace(cfg, **{"train.epochs": 2})."""
    nested: dict[str, dict[str, Any]] = {}
    flat: dict[str, Any] = {}
    for key, value in changes.items():
        head, _, rest = key.partition(".")
        if rest:
            nested.setdefault(head, {})[rest] = value
        else:
            flat[key] = value
    for head, sub in nested.items():
        flat[head] = replace(getattr(obj, head), **sub)
    hints = typing.get_type_hints(type(obj))
    unknown = sorted(set(flat) - set(hints))
    if unknown:
        raise ConfigError(f"{type(obj).__name__}: unknown key(s) {unknown}")
    coerced = {
        k: v if dataclasses.is_dataclass(v) else _coerce(hints[k], v, f"{type(obj).__name__}.{k}")
        for k, v in flat.items()
    }
    return dataclasses.replace(obj, **coerced)  # type: ignore[type-var]


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping; errors name the file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read ({exc.strerror})") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path}: top level must be a mapping")
    return dict(data)
