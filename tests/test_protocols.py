"""Every paper config stays what the papers' code did, row by row: docs/protocols.yaml holds the
reference values with their sources; each row of each config is resolved for its GPU count and its
effective values (through the functions training uses) are checked against ftcl's stated value, and
that value against the reference unless a difference is stated. docs/PROTOCOLS.md's tables are
generated from the same file and must be current."""

from __future__ import annotations

import copy
import functools
import importlib.util
import math
from pathlib import Path

import pytest
import yaml

from ftcl import config
from ftcl.config import batch_layout
from ftcl.detection.train import base_lr, lr_at
from ftcl.schedules import learning_rate, linear_probe_lr
from ftcl.scores import histogram_range

REPO = Path(__file__).resolve().parents[1]


def _generator():
    spec = importlib.util.spec_from_file_location("docs_generate", REPO / "docs" / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


GENERATE = _generator()
DATA = GENERATE.load_protocols()


def gpus(pipeline: dict) -> int:
    launcher = pipeline.get("launcher") or {}
    stage = {**(launcher.get("slurm") or {}), **((launcher.get("stages") or {}).get("pretrain") or {})}
    return int(stage.get("gpus_per_node", 1)) * int(stage.get("nodes", 1))


@functools.cache
def pipeline(path: str) -> dict:
    return config.load_yaml(REPO / path)


def row_names(path: str, rows) -> list[str]:
    ablations = pipeline(path)["ablations"]
    if rows == "all":
        return [r["name"] for r in ablations]
    if rows == "baseline":
        return [r["name"] for r in ablations if r.get("baseline")]
    return list(rows)


@functools.cache
def resolved(path: str, row: str) -> tuple[config.RunConfig, int]:
    pipe = pipeline(path)
    rows = {r["name"]: r for r in pipe["ablations"]}
    assert row in rows, f"docs/protocols.yaml names row {row!r} of {path}, which the config does not have"
    cfg = config.resolve(overrides=config.flatten(rows[row].get("overrides") or {}), base=pipe["defaults"],
                         world=gpus(pipe), stages=pipe["stages"])
    return cfg, gpus(pipe)


# --- reference schedules, computed here from their specs (not by ftcl's functions) ---------------

def epoch_lrs(spec: dict) -> list[float]:
    """The lr of every epoch of a pretraining schedule spec: cosine ``lr_min + (lr - lr_min) (1 +
    cos(pi (e + first_epoch) / E)) / 2`` (MoCo's --cos: first_epoch 0, lr_min 0; the FT code's
    --cosine: first_epoch 1, lr_min = lr x 1e-3), or step ``lr x gamma ** #{m <= e}``."""
    lr, epochs = spec["lr"], spec["epochs"]
    if spec["schedule"] == "step":
        return [lr * spec["gamma"] ** sum(e >= m for m in spec["milestones"]) for e in range(epochs)]
    low = lr * spec["eta_min_ratio"]
    return [low + (lr - low) * (1 + math.cos(math.pi * (e + spec["first_epoch"]) / epochs)) / 2
            for e in range(epochs)]


def linear_lrs(spec: dict) -> list[float]:
    if spec["schedule"] == "step":
        return [spec["lr"] * spec["gamma"] ** sum(e >= m for m in spec["milestones"]) for e in range(spec["epochs"])]
    return [spec["lr"] * (1 + math.cos(math.pi * e / spec["epochs"])) / 2 for e in range(spec["epochs"])]


def detection_checkpoints(spec: dict) -> list[int]:
    """Iterations where Detectron2's WarmupMultiStepLR changes, and their neighbours."""
    w, its = spec["warmup_iterations"], spec["iterations"]
    marks = {0, w // 2, max(w - 1, 0), w, its - 1, *spec["milestones"], *(m - 1 for m in spec["milestones"])}
    return sorted(i for i in marks if 0 <= i < its)


def detection_lrs(spec: dict) -> list[float]:
    out = []
    for it in detection_checkpoints(spec):
        factor = 1.0
        if it < spec["warmup_iterations"]:
            alpha = it / spec["warmup_iterations"]
            factor = spec["warmup_factor"] * (1 - alpha) + alpha
        out.append(spec["lr"] * factor * spec["gamma"] ** sum(it >= m for m in spec["milestones"]))
    return [spec["iterations"], *out]


EXPECTED = {"@lr_schedule": epoch_lrs, "@linear_lr_schedule": linear_lrs, "@detection_lr_schedule": detection_lrs}


def expected(key: str, value):
    return EXPECTED[key](value) if key in EXPECTED and isinstance(value, dict) else value


# --- ftcl's effective values, through the functions training uses ---------------------------------

def effective(cfg: config.RunConfig, world: int, key: str, spec):
    layout = batch_layout(cfg, world)
    det, lin, o = cfg.detection, cfg.eval.linear, cfg.optim
    derived = {
        "@world": lambda: world,
        "@per_process_batch": lambda: layout.per_process,
        "@bn_splits": lambda: layout.bn_splits,
        "@lr": lambda: learning_rate(o, o.warmup_epochs, 0, 1),
        "@lr_schedule": lambda: [learning_rate(o, e, 0, 1) for e in range(o.epochs)],
        "@linear_lr_schedule": lambda: [linear_probe_lr(lin, e) for e in range(lin.epochs)],
        "@detection_lr_schedule": lambda: [det.iterations, *(
            lr_at(i, base_lr(det), det.warmup_iterations, det.warmup_factor, det.milestones, det.gamma)
            for i in detection_checkpoints(spec))],
        "@detection_test_size": lambda: det.min_size[-1],
        "@histogram_range": lambda: list(histogram_range(cfg.scores.range, cfg.ft.positive)),
    }
    if key.startswith("@"):
        assert key in derived, f"unknown derived key {key!r} in docs/protocols.yaml"
        return derived[key]()
    flat = config.flatten(config.to_dict(cfg))
    assert key in flat, f"docs/protocols.yaml names {key!r}, which is not a run-config key"
    return flat[key]


def same(actual, wanted) -> bool:
    if isinstance(wanted, list) and isinstance(actual, list | tuple):
        return len(actual) == len(wanted) and all(same(a, e) for a, e in zip(actual, wanted))
    if isinstance(wanted, bool) or isinstance(actual, bool):
        return actual == wanted
    if isinstance(wanted, int | float) and isinstance(actual, int | float):
        return math.isclose(actual, wanted, rel_tol=1e-9, abs_tol=1e-12)
    return str(actual) == str(wanted)


CHECKS = [(path, section["title"], s, row)
          for section in DATA["sections"] for path in section["configs"] for s in section["settings"] if s["key"]
          for row in row_names(path, s["rows"])]


def test_every_paper_config_and_every_row_is_covered():
    shipped = {f"config/paper/{p.name}" for p in (REPO / "config" / "paper").glob("*.yaml")}
    covered = {path for path, *_ in CHECKS}
    assert shipped <= covered, f"paper configs without protocol settings: {sorted(shipped - covered)}"
    for path in shipped:
        checked = {row for p, _, _, row in CHECKS if p == path}
        rows = set(row_names(path, "all"))
        assert rows <= checked, f"{path}: rows {sorted(rows - checked)} are checked against no reference"


def test_every_stated_difference_is_one_and_every_unstated_one_fails():
    """A setting whose ftcl value differs from the reference must say why; an unknown reference
    (null) always comes with ftcl's own value and its reason."""
    for section in DATA["sections"]:
        for s in section["settings"]:
            name = f"{section['title']}: {s['setting']}"
            assert s["source"], f"{name} has no source"
            if "ftcl" in s and not same(expected(s["key"] or "", s["ftcl"]), expected(s["key"] or "", s["reference"])):
                assert s.get("difference"), f"{name}: ftcl's value differs from the reference; say why in 'difference'"
            if s["reference"] is None:
                assert "ftcl" in s and s.get("difference"), f"{name}: no reference value, so state ftcl's and why"


@pytest.mark.parametrize(("path", "title", "setting", "row"), CHECKS,
                         ids=[f"{p.split('/')[-1]}:{r}:{s['setting']}" for p, _, s, r in CHECKS])
def test_each_row_has_the_reference_value_or_its_stated_difference(path, title, setting, row):
    cfg, world = resolved(path, row)
    cfg = copy.deepcopy(cfg)
    key = setting["key"]
    wanted_raw = setting["ftcl"] if "ftcl" in setting else setting["reference"]
    wanted = expected(key, wanted_raw)
    actual = effective(cfg, world, key, wanted_raw)
    assert same(actual, wanted), (
        f"{path} row {row!r}: {setting['setting']} ({key}) is {actual!r} but docs/protocols.yaml "
        f"({'ftcl' if 'ftcl' in setting else 'reference, ' + setting['source']}) says {wanted!r}; fix the config, "
        "or state the difference (ftcl value and why) in docs/protocols.yaml"
    )


def test_a_planted_wrong_value_fails_the_check(tmp_path):
    """MoCo v1 trained with the cosine of the other rows (the drift this check was written for)."""
    pipe = copy.deepcopy(pipeline("config/paper/imagenet1k_moco.yaml"))
    row = next(r for r in pipe["ablations"] if r["name"] == "moco_v1")
    row["overrides"]["optim.schedule"] = "cosine"
    cfg = config.resolve(overrides=config.flatten(row["overrides"]), base=pipe["defaults"], world=8)
    setting = next(s for sec in DATA["sections"] for s in sec["settings"] if s["setting"] == "lr schedule: MoCo v1")
    assert not same(effective(cfg, 8, "@lr_schedule", setting["reference"]), expected("@lr_schedule",
                                                                                       setting["reference"]))


def test_protocols_md_is_generated_from_the_data():
    assert GENERATE.main(["--check"]) == 0, "docs/PROTOCOLS.md is out of date: run python docs/generate.py"


def test_generated_tables_list_every_setting():
    text = (REPO / "docs" / "PROTOCOLS.md").read_text()
    for section in DATA["sections"]:
        for s in section["settings"]:
            assert f"| {s['setting']} |" in text
    assert yaml.safe_load((REPO / "docs" / "protocols.yaml").read_text())["sources"]


@pytest.mark.parametrize("path", sorted({path for path, *_ in CHECKS}))
def test_the_fp32_overlay_trains_every_row_of_a_paper_config_in_float32(path):
    """Both reference codes train in float32; config/overlays/fp32.yaml (merged by Snakemake as a second
    --configfile, deep-merged here the same way) turns the paper configs' bf16 autocast off in every row."""
    overlay = config.load_yaml(REPO / "config" / "overlays" / "fp32.yaml")
    merged = config.deep_merge(pipeline(path), overlay)
    for row in merged["ablations"]:
        overrides = config.flatten(row.get("overrides") or {})
        cfg = config.resolve(overrides=overrides, base=merged["defaults"], world=gpus(merged))
        assert cfg.optim.amp is False, row["name"]
        assert cfg == config.resolve(overrides={**overrides, "optim.amp": False}, base=pipeline(path)["defaults"],
                                     world=gpus(merged))  # nothing else changes
