"""The run config's JSON schema (``ftcl/resources/config.schema.yaml``): every single-key rule, checked
with messages that name the key, the value and what is allowed; and ``x-stages``, the stages whose
results each key decides (what reruns when)."""

from __future__ import annotations

import difflib
import functools
from collections.abc import Mapping
from typing import Any

import jsonschema
import yaml

from ftcl.config.merge import Config, resource_yaml
from ftcl.errors import ConfigError


@functools.cache
def schema() -> dict:
    """The JSON schema every resolved run config must satisfy (read once; do not modify it)."""
    return resource_yaml("config.schema.yaml")


def check_known_keys(overrides: Mapping[str, Any], where: str = "override") -> None:
    """Reject dotted keys the schema does not know, naming the key and the allowed ones."""
    sch = schema()
    for key in overrides:
        node = sch
        walked: list[str] = []
        for part in key.split("."):
            props = properties(node, sch)
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


def properties(node: Mapping, root: Mapping) -> dict | None:
    """Collect ``properties`` of a schema node, following ``allOf`` and local ``$ref``s; a property
    listed at several levels gets the keywords of all of them (the nearest wins)."""
    found: list[Mapping] = []
    if "$ref" in node:
        target = root
        for part in node["$ref"].lstrip("#/").split("/"):
            target = target[part]
        found.append(properties(target, root) or {})
    found += [properties(sub, root) or {} for sub in node.get("allOf", [])]
    found.append(node.get("properties", {}))
    props: dict = {}
    for level in found:
        for key, sub in level.items():
            props[key] = {**props.get(key, {}), **sub}
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
        props = properties(err.schema, sch) or {}
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




def stages_of(key: str) -> tuple[str, ...]:
    """The stages whose results depend on run-config key ``key`` (the deepest ``x-stages`` on its
    path through the schema); ``KeyError`` when no level of the path declares it."""
    sch = schema()
    node: Mapping | None = sch
    found: list[str] | None = None
    for part in key.split("."):
        props = properties(node, sch) if node is not None else None
        if not props or part not in props:
            break
        node = props[part]
        if "x-stages" in node:
            found = node["x-stages"]
    if found is None:
        raise KeyError(f"run-config key {key!r} has no `x-stages` in ftcl/resources/config.schema.yaml")
    return tuple(found)


def reads(stage: str, key: str) -> bool:
    """Whether ``stage`` reads run-config ``key`` (False for a key the schema no longer has, e.g. in
    a config.yaml written by an older ftcl)."""
    try:
        return stage in stages_of(key)
    except KeyError:
        return False


#: text Snakemake hands over for YAML's booleans and null (a profile's ``config:``, nested ``--config``)
_FLAG_TEXT = {"true": True, "True": True, "false": False, "False": False, "null": None, "None": None}


def merged_node(node: Mapping, root: Mapping) -> Mapping:
    """``node`` with a local ``$ref`` followed and its ``allOf`` parts merged (one level)."""
    out: dict = {}
    if "$ref" in node:
        target: Any = root
        for part in node["$ref"].lstrip("#/").split("/"):
            target = target[part]
        out.update(merged_node(target, root))
    for sub in node.get("allOf", []):
        out.update({k: v for k, v in merged_node(sub, root).items() if k != "properties"})
    out.update({k: v for k, v in node.items() if k not in ("$ref", "allOf")})
    return out


_JSON_TYPES = {str: "string", bool: "boolean", int: "integer", float: "number", type(None): "null"}


def _types(node: Mapping) -> set[str]:
    """The JSON types a schema node allows (from ``type`` or ``enum``); empty when it does not say."""
    if "enum" in node:
        return {_JSON_TYPES.get(type(v), "object") for v in node["enum"]}
    t = node.get("type")
    return set(t) if isinstance(t, list) else {t} if t else set()


def coerce_text(value: Any, node: Mapping, root: Mapping) -> Any:
    """``value`` with its text leaves given the types the schema ``node`` (of schema ``root``) asks for.

    Snakemake hands nested ``--config`` values, and with them a profile's ``config:``, to the
    workflow as text (``'8'``, ``'1.5'``, ``'True'``, ``'None'``). Where the schema allows no text, a
    text leaf is read as YAML and kept when that gives a value of another type; where it allows text
    and other types (``[string, boolean]``), only YAML's booleans and null are read back. Everything
    else is left as it is, for the validation to judge."""
    props = properties(node, root) or {}
    node = merged_node(node, root)
    if isinstance(value, Mapping):
        extra = node.get("additionalProperties")
        return {k: coerce_text(v, props.get(k, extra if isinstance(extra, Mapping) else {}), root)
                for k, v in value.items()}
    if isinstance(value, list) and isinstance(node.get("items"), Mapping):
        return [coerce_text(v, node["items"], root) for v in value]
    if not isinstance(value, str):
        return value
    types = _types(node)
    if not types:
        return value
    if "string" in types:
        if types <= {"string", "null"}:
            return None if "null" in types and value in ("null", "None") else value
        return _FLAG_TEXT.get(value, value)
    try:
        parsed = yaml.safe_load(value)
    except yaml.YAMLError:
        return value
    return value if isinstance(parsed, str) else parsed


def coerce_dotted(overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Dotted run-config ``overrides`` with their text values typed as :func:`coerce_text` does."""
    sch = schema()
    out = {}
    for key, value in overrides.items():
        node: Mapping = sch
        for part in key.split("."):
            node = (properties(merged_node(node, sch), sch) or {}).get(part, {})
        out[key] = coerce_text(value, node, sch)
    return out
