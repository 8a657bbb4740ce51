"""The pipeline's logic, without Snakemake: which rows and runs a pipeline config asks for, the
resolved run config of each row and seed, and what each stage's result depends on.

``workflow/rules/*.smk`` call this module (``PIPE = pipeline.load(config)``) and keep only paths
and command lines; aggregation reads the same rows through it. Everything here fails with a
``ConfigError`` naming the row, key or value, before any job is planned.

**Rows.** A row is a name plus dotted overrides of the run config (``ablations``). A row may carry
``grid: {key: [values, ...]}``: it expands to one row per combination, named
``<name>[<key>=<value>,...]`` (the key's last component), each checked like a hand-written row.
Exactly one row is the baseline (:func:`check_baseline`); ``compare_to`` names another row.

**What reruns when** (:func:`stage_digest`). The run schema marks each key with the stages whose
results depend on it (``x-stages`` in ``ftcl/resources/config.schema.yaml``); a stage's digest covers
those keys only, so editing ``eval.knn.k`` reruns kNN alone, ``detection.*`` detection alone, a
pretraining key that row's pretraining (and, through its new result, the stages that read it), and
tracking, logging or launcher keys nothing.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ftcl import config as runconfig
from ftcl.config import RunConfig
from ftcl.constants import PRETRAIN, RESULTS_DIR, STAGES
from ftcl.errors import ConfigError
from ftcl.pipeline import smoke
from ftcl.pipeline.digests import changed_keys, digest, stage_digest, stage_view
from ftcl.pipeline.rows import (
    RESERVED_NAMES,
    ROLES,
    Row,
    check_baseline,
    check_name,
    expand_grid,
    grid_labels,
    grid_value_text,
    parse_rows,
    row_description,
)
from ftcl.pipeline.schema import coerce, schema, validate
from ftcl.pipeline.settings import (
    check_slurm_profile,
    launcher_settings,
    processes,
    profiles_in_use,
    stage_settings,
    stage_world,
)

__all__ = ["Pipeline", "Row", "load", "read", "schema", "validate", "coerce", "parse_rows", "expand_grid",
           "grid_labels", "grid_value_text", "check_name", "check_baseline", "row_description", "check_data",
           "check_results_folder", "stage_view", "stage_digest", "digest", "changed_keys", "launcher_settings",
           "stage_settings", "processes", "stage_world", "profiles_in_use", "check_slurm_profile",
           "PIPELINE_KEYS", "RESERVED_NAMES", "ROLES", "ROOT_REQUIRED", "DETECTION_ROOT_REQUIRED",
           "NOT_FOR_AGGREGATION"]

#: run-config keys the pipeline sets for every run; rows and ``defaults`` may not set them
PIPELINE_KEYS = ("seed", "experiment", "tracking.uri", "tracking.artifact_root", "tracking.tags",
                 "tracking.parent_run_id", "tracking.run_name")
#: datasets without a default location (``data.root`` must be set)
ROOT_REQUIRED = ("cifar10", "cifar100", "imagefolder")
#: detection datasets read from ``detection.root``
DETECTION_ROOT_REQUIRED = ("voc", "folder")
#: the pipeline-config keys aggregation does not read: launcher settings change no result, and a
#: change of `defaults` reaches aggregation through the stage results it reruns
NOT_FOR_AGGREGATION = ("launcher", "defaults")


# --------------------------------------------------------------------------- checks on run configs
def _pipeline_keys_in(overrides: Mapping[str, Any], where: str) -> None:
    for key in overrides:
        for fixed in PIPELINE_KEYS:
            if key == fixed or key.startswith(f"{fixed}.") or fixed.startswith(f"{key}."):
                raise ConfigError(
                    f"{where}: key {key!r} is set by the pipeline for every run (seed from `seeds`, "
                    "experiment, tracking from the top-level `tracking`); remove it"
                )


def check_data(run_cfg: RunConfig, stages: Sequence[str], where: str) -> None:
    """Fail early on a dataset folder that does not exist, without loading the data: the training
    data for every stage, the detection data when ``detection`` is a requested stage."""
    data = run_cfg.data
    if data.root is None and data.dataset in ROOT_REQUIRED:
        raise ConfigError(
            f"{where}: key 'data.root' is not set; dataset {data.dataset!r} needs the folder that holds it")
    if data.root is not None and not Path(data.root).expanduser().exists():
        raise ConfigError(f"{where}: key 'data.root' is {data.root!r}, which does not exist; point it at your copy "
                          f"of {data.dataset}")
    if data.class_list is not None and not Path(data.class_list).is_file():
        raise ConfigError(f"{where}: key 'data.class_list' is {data.class_list!r}, which is not a file")
    det = run_cfg.detection
    if "detection" in stages and det.dataset in DETECTION_ROOT_REQUIRED:
        root = det.root
        if root is None or not Path(root).expanduser().exists():
            raise ConfigError(
                f"{where}: key 'detection.root' is {root!r}, which "
                + ("is not set" if root is None else "does not exist")
                + f"; detection.dataset {det.dataset!r} needs the folder holding "
                + ("VOCdevkit/VOC2007 (and VOC2012)" if det.dataset == "voc" else "its .xml files and images")
                + " (or leave `detection` out of `stages`)"
            )


# ------------------------------------------------------------------------------------ the pipeline
@dataclass
class Pipeline:
    """A checked pipeline config: its rows, each row's resolved run config (seed still to set),
    and where everything goes."""

    config: dict
    rows: list[Row]
    run_configs: dict[str, RunConfig]

    @property
    def experiment(self) -> str:
        return self.config["experiment"]

    @property
    def results_dir(self) -> Path:
        return Path(self.config.get("results_dir") or RESULTS_DIR)

    @property
    def exp_dir(self) -> Path:
        return self.results_dir / self.experiment

    @property
    def seeds(self) -> list[int]:
        return list(self.config["seeds"])

    @property
    def stages(self) -> list[str]:
        return list(self.config["stages"])

    @property
    def row_names(self) -> list[str]:
        return [row.name for row in self.rows]

    def row(self, name: str) -> Row:
        return next(row for row in self.rows if row.name == name)

    @property
    def baseline(self) -> str:
        return check_baseline(self.rows)

    def role(self, role: str) -> str | None:
        """The row with ``role`` (``floor`` or ``ceiling``), if any."""
        return next((row.name for row in self.rows if row.role == role), None)

    @property
    def references(self) -> dict[str, str]:
        """Row -> the row its deltas refer to (``compare_to``, else the baseline; none for the baseline)."""
        base = self.baseline
        return {row.name: row.compare_to or base for row in self.rows if row.name != base or row.compare_to}

    def run_config(self, row: str, seed: int) -> RunConfig:
        """The resolved run config of ``row`` and ``seed`` (what its stages run with; the seed comes
        from the checked ``seeds``, so nothing is validated again)."""
        cfg = self.run_configs[row]
        return runconfig.replace(cfg, {"seed": int(seed), "tracking.tags": {**cfg.tracking.tags, "seed": int(seed)}})

    def resolved_text(self, row: str, seed: int, stage: str) -> str:
        """The resolved file of ``row``, ``seed`` and ``stage`` (:mod:`ftcl.config.resolved`): checked
        for the processes the launcher gives the stage, which its job only checks by digest."""
        world = stage_world(self.config, stage) if stage == PRETRAIN else 1
        return runconfig.resolved.text(self.run_config(row, seed), world)

    def stage_digest(self, row: str, seed: int, stage: str) -> str:
        return stage_digest(self.run_config(row, seed), stage)

    def aggregation_text(self) -> str:
        """The pipeline config aggregation reads (``<experiment>/pipeline.yaml``): rows, seeds, stages,
        tracking; :data:`NOT_FOR_AGGREGATION` left out, so editing them does not rerun aggregation."""
        return yaml.safe_dump({k: v for k, v in self.config.items() if k not in NOT_FOR_AGGREGATION}, sort_keys=False)

    def tracking_store(self) -> dict:
        """Where every stage tracks (the same for every row: rows may not change it)."""
        tracking = next(iter(self.run_configs.values())).tracking
        return {"enabled": tracking.enabled, "uri": tracking.uri, "artifact_root": tracking.artifact_root}


def check_results_folder(cfg: Mapping) -> None:
    """``<results_dir>/<experiment>`` must be a folder inside ``results_dir`` (no '..', no '.')."""
    check_name(cfg["experiment"], "pipeline config", "key 'experiment'")
    root = Path(cfg.get("results_dir") or RESULTS_DIR).resolve()
    exp = (root / cfg["experiment"]).resolve()
    if exp == root or root not in exp.parents:
        raise ConfigError(f"pipeline config: key 'experiment' is {cfg['experiment']!r}, whose folder {exp} is not "
                          f"inside the results folder {root}")


def load(cfg: Mapping, *, resolve_runs: bool = True, check_paths: bool = True,
         source: str = "pipeline config") -> Pipeline:
    """Check a pipeline config and resolve every row's run config.

    ``resolve_runs=False`` checks rows and names only (aggregation, which needs no dataset);
    ``check_paths=False`` skips the dataset-folder checks. A config with ``smoke: true`` becomes its
    smoke version first (:func:`ftcl.pipeline.smoke.apply`; it writes the data of missing roots unless
    one of the two is off), whose last layer of overrides goes on top of every row's.
    """
    cfg = smoke.apply(validate(cfg, source), generate=resolve_runs and check_paths)
    check_results_folder(cfg)
    rows = parse_rows(cfg)
    if not resolve_runs:
        return Pipeline(cfg, rows, {})
    defaults = runconfig.flatten(cfg["defaults"])
    _pipeline_keys_in(defaults, "pipeline config defaults")
    planned = sorted({PRETRAIN, *cfg["stages"]}, key=STAGES.index)  # every other stage reads a pretraining
    for stage in planned:
        if stage != PRETRAIN and stage_world(cfg, stage) != 1:
            raise ConfigError(f"pipeline config: key 'launcher' gives the {stage} stage {stage_world(cfg, stage)} "
                              f"processes; {stage} runs as one process (one GPU): set its gpus_per_node / "
                              "tasks_per_node to 1 (launcher.stages.<stage> on SLURM)")
    runconfig.validate(runconfig.deep_merge(runconfig.defaults(), cfg["defaults"]), "pipeline config defaults")
    tracking = {"uri": cfg["tracking"]["uri"] or f"sqlite:///{cfg['results_dir']}/mlflow.db",
                "artifact_root": cfg["tracking"]["artifact_root"]}
    resolved = {}
    for row in rows:
        where = f"ablation row {row.name!r}"
        runconfig.check_known_keys(row.overrides, where=where)
        _pipeline_keys_in(row.overrides, where)
        base = runconfig.deep_merge(cfg["defaults"], {
            "experiment": cfg["experiment"],
            "tracking": {**tracking, "tags": {"row": row.name, "description": row_description(row),
                                              "overrides": json.dumps(row.overrides, sort_keys=True)}}})
        try:
            run_cfg = runconfig.resolve(overrides={**row.overrides, **smoke.overrides(cfg, row.name)}, base=base,
                                        world=stage_world(cfg, PRETRAIN), stages=planned)
        except ConfigError as err:
            raise ConfigError(f"{where}: {str(err).removeprefix('config: ')}") from None
        if check_paths:
            check_data(run_cfg, cfg["stages"], where)
        resolved[row.name] = run_cfg
    return Pipeline(cfg, rows, resolved)


def read(path: str | Path, **kwargs: Any) -> Pipeline:
    """:func:`load` of the pipeline config in file ``path``."""
    return load(runconfig.load_yaml(path), source=f"pipeline config {path}", **kwargs)
