"""Run configuration: defaults, YAML files, ``key=value`` overrides and schema validation.

A run's config is built in one order, always: ``resources/defaults.yaml``, then the YAML file the
user names, then ``--set dotted.key=value`` overrides. The result is validated against
``resources/config.schema.yaml`` before any data is read or any model is built; every error names
the key, the value and what would be accepted.
"""

from __future__ import annotations

import copy
import difflib
from collections.abc import Iterable, Mapping
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from ftcl.errors import ConfigError
from ftcl.files import write_text

Config = dict[str, Any]

__all__ = ["ConfigError"]  # defined in ftcl.errors, re-exported here


def _resource_yaml(name: str) -> Any:
    return yaml.safe_load(resources.files("ftcl.resources").joinpath(name).read_text())


def defaults() -> Config:
    """A fresh copy of the built-in defaults."""
    return _resource_yaml("defaults.yaml")


def schema() -> dict:
    """The JSON schema every resolved run config must satisfy."""
    return _resource_yaml("config.schema.yaml")


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


def check_known_keys(overrides: Mapping[str, Any], where: str = "override") -> None:
    """Reject dotted keys the schema does not know, naming the key and the allowed ones."""
    sch = schema()
    for key in overrides:
        node = sch
        walked: list[str] = []
        for part in key.split("."):
            props = _properties(node, sch)
            if props is None:
                break
            if part not in props:
                allowed = sorted(props)
                hint = difflib.get_close_matches(part, allowed, n=1)
                did_you_mean = f" (did you mean {'.'.join([*walked, hint[0]])!r}?)" if hint else ""
                prefix = ".".join(walked) or "the top level"
                raise ConfigError(
                    f"{where}: unknown key {key!r}{did_you_mean}; keys allowed under {prefix}: "
                    + ", ".join(allowed)
                )
            walked.append(part)
            node = props[part]


def _properties(node: Mapping, root: Mapping) -> dict | None:
    """Collect ``properties`` of a schema node, following ``allOf`` and local ``$ref``s."""
    props: dict = {}
    if "$ref" in node:
        target = root
        for part in node["$ref"].lstrip("#/").split("/"):
            target = target[part]
        props.update(_properties(target, root) or {})
    for sub in node.get("allOf", []):
        props.update(_properties(sub, root) or {})
    props.update(node.get("properties", {}))
    return props or None


def validate(cfg: Config, source: str = "config") -> Config:
    """Validate a resolved config; raise ``ConfigError`` naming the first bad key and value."""
    sch = schema()
    validator = jsonschema.Draft202012Validator(sch)
    errors = sorted(validator.iter_errors(cfg), key=lambda e: (len(e.path), list(map(str, e.path))))
    if not errors:
        return cfg
    raise ConfigError(f"{source}: " + _describe(errors[0], sch))


def _describe(err: jsonschema.ValidationError, sch: Mapping) -> str:
    key = ".".join(str(p) for p in err.path) or "<top level>"
    if err.validator == "additionalProperties":
        props = _properties(err.schema, sch) or {}
        extra = sorted(set(err.instance) - set(props))
        name = ".".join([*map(str, err.path), extra[0]]) if extra else key
        hint = difflib.get_close_matches(extra[0], list(props), n=1) if extra else []
        did_you_mean = f" (did you mean {hint[0]!r}?)" if hint else ""
        return f"unknown key {name!r}{did_you_mean}; allowed here: {', '.join(sorted(props))}"
    if err.validator == "enum":
        return f"key {key!r} has value {err.instance!r}; allowed: {', '.join(map(repr, err.validator_value))}"
    if err.validator == "type":
        want = err.validator_value
        want = " or ".join(want) if isinstance(want, list) else want
        return f"key {key!r} has value {err.instance!r} of type {type(err.instance).__name__}; expected {want}"
    if err.validator in {"minimum", "exclusiveMinimum", "maximum", "exclusiveMaximum"}:
        op = {"minimum": ">=", "exclusiveMinimum": ">", "maximum": "<=", "exclusiveMaximum": "<"}[err.validator]
        return f"key {key!r} has value {err.instance!r}; it must be {op} {err.validator_value}"
    return f"key {key!r} has value {err.instance!r}: {err.message}"


def resolve(
    path: str | Path | None = None,
    overrides: Iterable[str] | Mapping[str, Any] = (),
    base: Mapping | None = None,
) -> Config:
    """Build and validate a run config: defaults <- ``base`` <- file at ``path`` <- ``overrides``.

    ``overrides`` is either ``["a.b=1", ...]`` (command line) or ``{"a.b": 1}`` (an ablation row).
    """
    cfg = defaults()
    if base:
        cfg = deep_merge(cfg, base)
    source = "config"
    if path is not None:
        cfg = deep_merge(cfg, load_yaml(path))
        source = f"config file {path}"
    if not isinstance(overrides, Mapping):
        overrides = dict(parse_override(o) for o in overrides)
    if overrides:
        check_known_keys(overrides)
        cfg = deep_merge(cfg, dotted_to_nested(overrides))
    return validate(cfg, source)


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


def dump(cfg: Mapping, path: str | Path) -> None:
    """Write a config as YAML (atomically), so a run folder always records what ran."""
    write_text(path, yaml.safe_dump(dict(cfg), sort_keys=False))
