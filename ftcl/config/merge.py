"""Run configs as plain data: the built-in defaults, YAML files, ``key=value`` overrides, merging,
flattening and writing. No validation here (:mod:`ftcl.config.schema`), no types (:mod:`ftcl.config.types`)."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from ftcl.errors import ConfigError
from ftcl.files import write_text

Config = dict[str, Any]


def resource_yaml(name: str) -> Any:
    return yaml.safe_load(resources.files("ftcl.resources").joinpath(name).read_text())


def defaults() -> Config:
    """A fresh copy of the built-in defaults."""
    return resource_yaml("defaults.yaml")


def deep_merge(base: Mapping, update: Mapping) -> Config:
    """Return ``base`` updated recursively by ``update`` (dicts merge, everything else replaces)."""
    out = copy.deepcopy(dict(base))
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def load_yaml(path: str | Path) -> Config:
    """Read a YAML mapping, with errors that name the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist (give an existing YAML file)")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path} is not valid YAML ({_yaml_problem(err)})") from err
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of keys, got {type(data).__name__}")
    return data


def _yaml_problem(err: yaml.YAMLError) -> str:
    """One line: where and what, e.g. ``line 2, column 1: expected ',' or ']'``."""
    mark = getattr(err, "problem_mark", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    return where + problem


def parse_override(text: str) -> tuple[str, Any]:
    """Parse ``dotted.key=value``; the value is read as YAML (so ``1e-3``, ``true``, ``[1, 2]`` work)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key=value, e.g. optim.epochs=10")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as err:
        raise ConfigError(f"override {text!r}: value {raw!r} is not valid YAML ({_yaml_problem(err)})") from err
    return key, value


def dotted_to_nested(overrides: Mapping[str, Any]) -> Config:
    """``{"a.b": 1}`` -> ``{"a": {"b": 1}}``; nested mappings are kept as they are."""
    nested: Config = {}
    for key, value in overrides.items():
        parts = key.split(".")
        node = nested
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override key {key!r} sets a value both at and below {part!r}")
        if isinstance(value, Mapping) and isinstance(node.get(parts[-1]), Mapping):
            node[parts[-1]] = deep_merge(node[parts[-1]], value)
        else:
            node[parts[-1]] = value
    return nested


def flatten(cfg: Mapping, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (lists stay values), e.g. for MLflow params."""
    flat: dict[str, Any] = {}
    for key, value in cfg.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def dump(cfg: Any, path: str | Path) -> None:
    """Write a config (a mapping or a :class:`~ftcl.config.types.RunConfig`) as YAML, atomically, so a
    run folder always records what ran."""
    from ftcl.config.types import to_dict

    cfg = to_dict(cfg)
    write_text(path, yaml.safe_dump(dict(cfg), sort_keys=False))
