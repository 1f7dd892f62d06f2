"""Typed YAML configs: a dataclass per job, unknown or missing keys are errors, ``key=value`` overrides.

Every entry point (``python -m ops.<job>``, ``python -m workflows.<stage>``, ``python -m evaluation``)
loads its YAML through `load_config`, so a typo in a config fails before any work starts and names the key.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A config that does not match its schema; the message names the key and the file."""


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check (and gently convert) ``value`` against the annotation ``tp``."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, where)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(f"{where}: {value!r} matches none of {[_type_name(a) for a in args]}")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{where}: {value!r} is not one of {list(args)}")
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping for {tp.__name__}, got {type(value).__name__}")
        return from_dict(tp, value, where)
    if origin in (list, tuple, Sequence):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        inner = args[0] if args else Any
        items = [_coerce(v, inner, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        key_t, val_t = args or (Any, Any)
        return {_coerce(k, key_t, where): _coerce(v, val_t, f"{where}.{k}") for k, v in value.items()}
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    if tp is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if tp is bool and not isinstance(value, bool):
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if isinstance(tp, type) and not isinstance(value, tp):
        raise ConfigError(f"{where}: expected {tp.__name__}, got {type(value).__name__} {value!r}")
    return value


def from_dict(cls: type[T], raw: dict[str, Any], where: str = "config") -> T:
    """Build dataclass ``cls`` from ``raw``; every unknown key and every missing required key is named."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(fields)}")
    missing = [name for name, f in fields.items() if name not in raw and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]  # fmt: skip
    if missing:
        raise ConfigError(f"{where}: missing required key(s) {missing}")
    values = {name: _coerce(value, hints[name], f"{where}.{name}") for name, value in raw.items()}
    try:
        return cls(**values)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{where}: {err}") from err


def apply_overrides(raw: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """``a.b=3`` sets raw['a']['b'] = 3 and ``sources.0.path=x`` the first list item's path (values parsed as YAML)."""
    raw = json.loads(json.dumps(raw))  # deep copy
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value")
        dotted, value = item.split("=", 1)
        node: Any = raw
        *parents, leaf = dotted.split(".")
        for part in parents:
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise ConfigError(f"override {item!r}: {part} is not an index of a {len(node)}-item list")
                node = node[int(part)]
            elif isinstance(node, dict):
                node = node.setdefault(part, {})
            else:
                raise ConfigError(f"override {item!r}: {part} is not a mapping or list")
        if isinstance(node, list):
            if not leaf.isdigit() or int(leaf) >= len(node):
                raise ConfigError(f"override {item!r}: {leaf} is not an index of a {len(node)}-item list")
            node[int(leaf)] = yaml.safe_load(value)
        elif isinstance(node, dict):
            node[leaf] = yaml.safe_load(value)
        else:
            raise ConfigError(f"override {item!r}: cannot set {leaf} on a {type(node).__name__}")
    return raw


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    return raw


def load_config(cls: type[T], path: str | Path | None = None, overrides: Sequence[str] = (),
                raw: dict[str, Any] | None = None) -> T:  # fmt: skip
    """YAML file (or an already-read mapping) + overrides -> typed, validated config."""
    data = raw if raw is not None else read_yaml(path) if path is not None else {}
    return from_dict(cls, apply_overrides(data, overrides), where=str(path or cls.__name__))


def to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)


def fingerprint(config: Any) -> str:
    """Stable short hash of a config: decides whether a finished stage's output is still valid."""
    blob = json.dumps(to_dict(config) if dataclasses.is_dataclass(config) else config, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def flatten(config: Any, prefix: str = "") -> dict[str, Any]:
    """Nested config -> {"a.b": value} for MLflow params."""
    data = to_dict(config) if dataclasses.is_dataclass(config) else config
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def arg_parser(description: str) -> argparse.ArgumentParser:
    """``--config FILE [key=value ...]``: the shared command line of every job (a job may add its own flags)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", required=True, help="YAML config file")
    parser.add_argument("overrides", nargs="*", help="key=value overrides (dotted keys for nested sections)")
    return parser


def cli(cls: type[T], description: str, argv: Sequence[str] | None = None) -> T:
    """``--config FILE [key=value ...]`` -> typed config."""
    args = arg_parser(description).parse_args(argv)
    return load_config(cls, args.config, args.overrides)
