"""Ablation rows: a name plus dotted overrides of the run config; grid rows expand to one row per
combination, named ``<name>[<key>=<value>,...]``; exactly one row is the baseline."""

from __future__ import annotations

import itertools
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ftcl import config as runconfig
from ftcl.errors import ConfigError

#: what ``<results_dir>/<experiment>/`` holds besides the row folders
RESERVED_NAMES = ("tables", "plots", "logs", "pipeline.yaml", "mlflow_experiment.txt", "report.html",
                  "snakemake-report.html")
#: a row's ``role``: ``floor`` (what no learning gives: a randomly initialised backbone, evaluated the
#: same way) and ``ceiling`` (what labels give: the same backbone trained supervised for the same budget)
ROLES = ("floor", "ceiling")


@dataclass(frozen=True)
class Row:
    """One ablation row: a name plus dotted overrides (a grid row: one combination of its grid)."""

    name: str
    overrides: dict[str, Any]
    baseline: bool = False
    compare_to: str | None = None
    description: str = ""
    published: dict[str, float] = field(default_factory=dict)
    group: str = ""  # the hand-written row it comes from (its own name unless it is a grid row)
    role: str | None = None  # "floor" (e.g. a random-init backbone) or "ceiling" (e.g. supervised)


def grid_value_text(value: Any) -> str:
    """A grid value as it appears in a generated row name: ``1.0 -> 1``, ``True -> true``."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, list | tuple):
        return "-".join(grid_value_text(v) for v in value)
    return str(value)


def grid_labels(keys: Sequence[str]) -> dict[str, str]:
    """Short labels of grid keys for row names: the last dotted component, longer where two keys
    would share it (``ft.positive.alpha`` and ``ft.negative.alpha`` -> ``positive.alpha``, ...)."""
    labels = {}
    for key in keys:
        parts = key.split(".")
        for n in range(1, len(parts) + 1):
            label = ".".join(parts[-n:])
            if sum(1 for other in keys if other == label or other.endswith("." + label)) == 1:
                break
        labels[key] = label
    return labels


def expand_grid(row: Mapping) -> list[dict]:
    """A hand-written row, or one row per combination of its ``grid`` (in the grid's key order,
    the last key varying fastest), each with the combination added to its overrides."""
    grid = row.get("grid") or {}
    if not grid:
        return [dict(row)]
    where = f"ablation row {row['name']!r}"
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{where}: grid.{key} must be a non-empty list of values, got {values!r}")
        if len({json.dumps(v, sort_keys=True) for v in values}) != len(values):
            raise ConfigError(f"{where}: grid.{key} repeats a value ({values!r})")
    if row.get("baseline"):
        raise ConfigError(f"{where}: a grid row cannot be the baseline (it expands to several rows)")
    overrides = runconfig.flatten(row.get("overrides") or {})
    clash = sorted(set(grid) & set(overrides))
    if clash:
        raise ConfigError(f"{where}: {', '.join(map(repr, clash))} set both in overrides and in grid")
    labels = grid_labels(list(grid))
    rows = []
    for combo in itertools.product(*grid.values()):
        chosen = dict(zip(grid, combo))
        name = row["name"] + "[" + ",".join(f"{labels[k]}={grid_value_text(v)}" for k, v in chosen.items()) + "]"
        text = (row.get("description") or "").strip()
        extra = ", ".join(f"{k}={json.dumps(v)}" for k, v in chosen.items())
        rows.append({**{k: v for k, v in row.items() if k not in ("grid", "published")}, "name": name,
                     "overrides": {**overrides, **chosen}, "group": row["name"],
                     "description": f"{text} ({extra})" if text else extra})
    return rows


def check_name(name: str, what: str, key: str) -> None:
    """A name that becomes a folder: not hidden, not a reserved name, no path separator."""
    if not name or name.startswith(".") or "/" in name or "\\" in name:
        raise ConfigError(f"{what}: {key} {name!r} cannot be a folder name inside the results folder; use letters, "
                          "digits and + = _ . , @ [ ] - without a leading '.'")


def check_baseline(rows: Sequence[Row]) -> str:
    """The one row with ``baseline: true`` (the table's reference); ConfigError unless exactly one."""
    marked = [row.name for row in rows if row.baseline]
    if len(marked) != 1:
        raise ConfigError(
            f"exactly one ablation row must have `baseline: true`; found {len(marked)}"
            + (f" ({', '.join(map(repr, marked))})" if marked else "")
        )
    return marked[0]


def parse_rows(cfg: Mapping) -> list[Row]:
    """The rows of a (validated) pipeline config, grids expanded, names and references checked."""
    rows: list[Row] = []
    for raw in cfg["ablations"]:
        for row in expand_grid(raw):
            where = f"ablation row {row['name']!r}"
            check_name(row["name"], where, "the name")
            if row["name"] in RESERVED_NAMES:
                raise ConfigError(f"{where}: the name is reserved for " + ", ".join(RESERVED_NAMES))
            if any(r.name == row["name"] for r in rows):
                raise ConfigError(f"{where}: the name is used by two rows; row names must be unique")
            rows.append(Row(name=row["name"], overrides=runconfig.flatten(row.get("overrides") or {}),
                            baseline=bool(row.get("baseline")), compare_to=row.get("compare_to"),
                            description=(row.get("description") or "").strip(),
                            published=dict(row.get("published") or {}), group=row.get("group", row["name"]),
                            role=row.get("role")))
    names = [r.name for r in rows]
    for row in rows:
        if row.compare_to is not None and (row.compare_to not in names or row.compare_to == row.name):
            raise ConfigError(f"ablation row {row.name!r}: compare_to {row.compare_to!r} must name another row "
                              f"(rows: {', '.join(n for n in names if n != row.name)})")
    check_baseline(rows)
    for role in ROLES:
        holders = [r.name for r in rows if r.role == role]
        if len(holders) > 1:
            raise ConfigError(f"at most one ablation row may have `role: {role}`; found "
                              + ", ".join(map(repr, holders)))
    return rows


def row_description(row: Row) -> str:
    """The parent run's description in the MLflow UI: the row's text and its own overrides."""
    listed = ", ".join(f"{k}={json.dumps(v)}" for k, v in row.overrides.items()) or "none (the pipeline defaults)"
    return f"{row.description}\n\nrow overrides: {listed}".strip()
