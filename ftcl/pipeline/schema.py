"""The pipeline config's schema (``ftcl/resources/pipeline.schema.yaml``): loading, typing back the
text Snakemake hands over, validation with defaults filled in."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from importlib import resources
from typing import Any

import yaml

from ftcl import config as runconfig
from ftcl.errors import ConfigError


def schema() -> dict:
    """The JSON schema of a pipeline config (``workflow/schemas/config.schema.yaml`` links to it)."""
    return yaml.safe_load(resources.files("ftcl.resources").joinpath("pipeline.schema.yaml").read_text())


def _fill_defaults(value: Any, node: Mapping) -> Any:
    """``value`` with the schema's ``default``s filled in for missing object properties (recursively,
    through ``items`` of arrays), as Snakemake's ``validate(..., set_default=True)`` does."""
    if isinstance(value, dict):
        out = dict(value)
        for key, sub in (node.get("properties") or {}).items():
            if key not in out and "default" in sub:
                out[key] = copy.deepcopy(sub["default"])
            if key in out:
                out[key] = _fill_defaults(out[key], sub)
        return out
    if isinstance(value, list) and isinstance(node.get("items"), Mapping):
        return [_fill_defaults(v, node["items"]) for v in value]
    return value


def coerce(cfg: Mapping) -> dict:
    """The pipeline config with the values Snakemake handed over as text (a profile's ``config:``,
    nested ``--config``) given their types back: the pipeline schema's, and the run schema's inside
    ``defaults`` and the rows' ``overrides`` (:func:`ftcl.config.schema.coerce_text`)."""
    from ftcl.config.schema import coerce_dotted, coerce_text

    out = coerce_text(dict(cfg), schema(), schema())
    if isinstance(out.get("defaults"), Mapping):
        out["defaults"] = coerce_text(out["defaults"], runconfig.schema(), runconfig.schema())
    if isinstance(out.get("ablations"), list):
        out["ablations"] = [{**row, "overrides": coerce_dotted(runconfig.flatten(row["overrides"]))}
                            if isinstance(row, Mapping) and isinstance(row.get("overrides"), Mapping) else row
                            for row in out["ablations"]]
    return out


def validate(cfg: Mapping, source: str = "pipeline config") -> dict:
    """The pipeline config (text values typed back, :func:`coerce`) checked against its schema, with
    defaults filled in."""
    import jsonschema

    cfg = coerce(cfg)
    sch = schema()
    errors = sorted(jsonschema.Draft202012Validator(sch).iter_errors(dict(cfg)), key=lambda e: list(map(str, e.path)))
    if errors:
        err = errors[0]
        where = ".".join(map(str, err.path)) or "<top level>"
        raise ConfigError(f"{source}: key {where!r}: {err.message}")
    return _fill_defaults(dict(cfg), sch)
