"""Run configuration: one run's settings, resolved once into a frozen, typed :class:`RunConfig`.

A run's config is built in one order, always: ``resources/defaults.yaml``, then (in the pipeline) the
row's ``defaults`` and overrides, or the YAML file the user names, then ``--set dotted.key=value``
overrides. :func:`resolve` checks every single-key rule (the JSON schema, :mod:`ftcl.config.schema`)
and every cross-key rule (:mod:`ftcl.config.rules`, for the process count the stage will run on)
before any data is read or any model is built, and returns the typed config
(:mod:`ftcl.config.types`: frozen dataclasses, chosen over a validation library because the JSON
schema already is the single source of the rules, of the docs and of Snakemake's validation). Every
error names the key, the value and what would be accepted.

The pipeline resolves every row while Snakemake plans and hands each job a resolved file
(:mod:`ftcl.config.resolved`), which the job only checks for its digest.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from ftcl.config import resolved
from ftcl.config.merge import Config, deep_merge, defaults, dotted_to_nested, dump, flatten, load_yaml, parse_override
from ftcl.config.rules import BatchLayout, batch_layout, check
from ftcl.config.schema import check_known_keys, reads, schema, stages_of, validate
from ftcl.config.types import RunConfig, from_dict, to_dict
from ftcl.constants import STAGES
from ftcl.errors import ConfigError

__all__ = [
    "BatchLayout", "Config", "ConfigError", "RunConfig", "batch_layout", "check", "check_known_keys", "deep_merge",
    "defaults", "dotted_to_nested", "dump", "flatten", "from_dict", "load_yaml", "merge", "parse_override", "reads",
    "replace", "resolve", "resolved", "schema", "stages_of", "to_dict", "validate",
]


def merge(
    path: str | Path | None = None,
    overrides: Iterable[str] | Mapping[str, Any] = (),
    base: Mapping | None = None,
) -> Config:
    """The run config as a validated mapping: defaults <- ``base`` <- file at ``path`` <- ``overrides``
    (``["a.b=1", ...]`` from a command line or ``{"a.b": 1}`` from an ablation row), every single-key
    rule checked (the schema)."""
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


def resolve(
    path: str | Path | None = None,
    overrides: Iterable[str] | Mapping[str, Any] = (),
    base: Mapping | None = None,
    *,
    world: int = 1,
    stages: Sequence[str] = STAGES,
) -> RunConfig:
    """The typed run config of :func:`merge`, with the cross-key rules of the ``stages`` it will run
    checked for a pretraining on ``world`` processes (:func:`ftcl.config.rules.check`)."""
    cfg = from_dict(RunConfig, merge(path, overrides, base))
    check(cfg, world, stages)
    return cfg


def replace(cfg: RunConfig, changes: Mapping[str, Any]) -> RunConfig:
    """``cfg`` with dotted ``changes`` (``{"seed": 3}``), for values that were checked already (the
    pipeline's seeds): nothing is validated again."""
    return from_dict(RunConfig, deep_merge(to_dict(cfg), dotted_to_nested(dict(changes))))
