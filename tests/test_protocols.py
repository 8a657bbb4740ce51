"""docs/PROTOCOLS.md stays true: every paper config, resolved for its GPU count, has the effective
values the protocol tables say, so a later edit cannot drift from the papers silently."""

from __future__ import annotations

import copy
import functools
import math
import re
from pathlib import Path

import pytest
import yaml

from ftcl import config
from ftcl.evaluate import _linear_lr
from ftcl.scores import histogram_range
from ftcl.train import batch_layout, learning_rate

REPO = Path(__file__).resolve().parents[1]
PROTOCOLS = REPO / "docs" / "PROTOCOLS.md"


def protocol_rows() -> list[tuple[str, str, str, str, str]]:
    """``(config path, setting, row, key, value)`` for every table row of PROTOCOLS.md with a key,
    once per config its section applies to."""
    rows, applies = [], []
    for line in PROTOCOLS.read_text().splitlines():
        if line.startswith("Applies to:"):
            applies = re.findall(r"`(config/paper/[^`]+\.yaml)`", line)
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if not line.startswith("|") or len(cells) != 6 or cells[0] in ("setting", "---") or set(cells[0]) <= {"-"}:
            continue
        setting, _, row, key, value, _ = cells
        if key:
            rows += [(path, setting, row, key, value.strip("`")) for path in applies]
    return rows


def gpus(pipeline: dict) -> int:
    launcher = pipeline.get("launcher") or {}
    stage = {**(launcher.get("slurm") or {}), **((launcher.get("stages") or {}).get("pretrain") or {})}
    return int(stage.get("gpus_per_node", 1)) * int(stage.get("nodes", 1))


@functools.cache
def resolved(path: str, row: str) -> tuple[dict, int]:
    pipeline = config.load_yaml(REPO / path)
    rows = {r["name"]: r for r in pipeline["ablations"]}
    name = next(r["name"] for r in pipeline["ablations"] if r.get("baseline")) if row == "-" else row
    assert name in rows, f"{path}: PROTOCOLS.md names row {row!r}, which the config does not have"
    cfg = config.resolve(overrides=config.flatten(rows[name].get("overrides") or {}), base=pipeline["defaults"])
    return cfg, gpus(pipeline)


def effective(cfg: dict, world: int, key: str):
    layout = batch_layout(cfg, world)
    det, lin = cfg["detection"], cfg["eval"]["linear"]
    derived = {
        "@world": lambda: world,
        "@per_process_batch": lambda: layout.per_process,
        "@bn_splits": lambda: layout.bn_splits,
        "@lr": lambda: learning_rate(cfg, 0, 0, 1),
        "@eta_min": lambda: learning_rate(cfg, 0, 0, 1) * cfg["optim"]["eta_min_ratio"],
        "@linear_lr_first": lambda: _linear_lr(lin, 0),
        "@linear_lr_last": lambda: _linear_lr(lin, lin["epochs"] - 1),
        "@detection_lr": lambda: det["lr_per_16"] * det["batch_size"] / 16,
        "@detection_test_size": lambda: det["min_size"][-1],
        "@histogram_range": lambda: list(histogram_range(cfg["scores"], cfg["ft"])),
    }
    if key.startswith("@"):
        assert key in derived, f"unknown derived key {key!r} in PROTOCOLS.md"
        return derived[key]()
    flat = config.flatten(cfg)
    assert key in flat, f"PROTOCOLS.md names {key!r}, which is not a run-config key"
    return flat[key]


def same(actual, expected) -> bool:
    if isinstance(expected, list) and isinstance(actual, list | tuple):
        return len(actual) == len(expected) and all(same(a, e) for a, e in zip(actual, expected))
    if isinstance(expected, bool) or isinstance(actual, bool):
        return actual == expected
    if isinstance(expected, int | float) and isinstance(actual, int | float):
        return math.isclose(actual, expected, rel_tol=1e-9, abs_tol=1e-12)
    return str(actual) == str(expected)


ROWS = protocol_rows()


def test_protocols_cover_every_paper_config():
    covered = {path for path, *_ in ROWS}
    shipped = {f"config/paper/{p.name}" for p in (REPO / "config" / "paper").glob("*.yaml")}
    assert shipped <= covered, f"paper configs without a protocol table in PROTOCOLS.md: {sorted(shipped - covered)}"


@pytest.mark.parametrize(("path", "setting", "row", "key", "value"), ROWS,
                         ids=[f"{p.split('/')[-1]}:{s}" for p, s, *_ in ROWS])
def test_protocol_table_matches_the_resolved_config(path, setting, row, key, value):
    cfg, world = resolved(path, row)
    cfg = copy.deepcopy(cfg)
    expected = yaml.safe_load(value)
    actual = effective(cfg, world, key)
    assert same(actual, expected), (
        f"{path} row {row!r}: {setting} ({key}) is {actual!r} but docs/PROTOCOLS.md says {expected!r}; "
        "update the table (with the reason for any difference) or the config"
    )
