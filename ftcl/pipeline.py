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

import copy
import functools
import hashlib
import itertools
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from ftcl import config as runconfig
from ftcl.config import RunConfig, reads, to_dict
from ftcl.constants import PRETRAIN, RESULTS_DIR, STAGES
from ftcl.errors import ConfigError

#: run-config keys the pipeline sets for every run; rows and ``defaults`` may not set them
PIPELINE_KEYS = ("seed", "experiment", "tracking.uri", "tracking.artifact_root", "tracking.tags",
                 "tracking.parent_run_id", "tracking.run_name")
#: what ``<results_dir>/<experiment>/`` holds besides the row folders
RESERVED_NAMES = ("tables", "plots", "logs", "pipeline.yaml", "mlflow_experiment.txt", "report.html",
                  "snakemake-report.html")
#: a row's ``role``: ``floor`` (what no learning gives: a randomly initialised backbone, evaluated the
#: same way) and ``ceiling`` (what labels give: the same backbone trained supervised for the same budget)
ROLES = ("floor", "ceiling")
#: datasets without a default location (``data.root`` must be set)
ROOT_REQUIRED = ("cifar10", "cifar100", "imagefolder")
#: detection datasets read from ``detection.root``
DETECTION_ROOT_REQUIRED = ("voc", "folder")
#: the pipeline-config keys aggregation does not read: launcher settings change no result, and a
#: change of `defaults` reaches aggregation through the stage results it reruns
NOT_FOR_AGGREGATION = ("launcher", "defaults")


# ------------------------------------------------------------------------------ the pipeline schema
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


# ------------------------------------------------------------------------------------------ rows
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


# --------------------------------------------------------------------------- what each stage reads
@functools.cache
def _default_items() -> frozenset:
    return frozenset((k, json.dumps(v, sort_keys=True)) for k, v in runconfig.flatten(runconfig.defaults()).items())


def stage_view(run_cfg: RunConfig | Mapping, stage: str) -> dict[str, Any]:
    """The flattened run-config keys ``stage``'s result depends on, leaving out keys at ftcl's
    built-in default: a key that a new ftcl version adds (at its default) reruns nothing, while
    setting it, or changing any value away from or back to the default, does."""
    if stage not in STAGES:
        raise ValueError(f"stage {stage!r} is not one of {STAGES}")
    defaults = _default_items()
    return {k: v for k, v in sorted(runconfig.flatten(to_dict(run_cfg)).items())
            if reads(stage, k) and (k, json.dumps(v, sort_keys=True)) not in defaults}


def digest(obj: Any) -> str:
    """A short content fingerprint (sha256 of canonical JSON)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def stage_digest(run_cfg: RunConfig | Mapping, stage: str) -> str:
    """The fingerprint of what ``stage`` reads from ``run_cfg``; a stage reruns when it changes."""
    return digest({"stage": stage, "keys": stage_view(run_cfg, stage)})


def changed_keys(before: RunConfig | Mapping, after: RunConfig | Mapping, stage: str) -> list[str]:
    """``key (old -> new)`` for each key of ``stage`` whose value differs between two run configs."""
    old, new = ({k: v for k, v in runconfig.flatten(to_dict(cfg)).items() if reads(stage, k)}
                for cfg in (before, after))
    return [f"{k} ({old.get(k, '<unset>')!r} -> {new.get(k, '<unset>')!r})"
            for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]


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


def launcher_settings(name: str, settings: Mapping[str, Any]) -> dict:
    """A ``launcher:`` section for launcher ``name`` with ``settings`` (e.g. ``ftcl stage -o`` options),
    checked against the pipeline schema (names, types; text values typed back) with its defaults."""
    probe = {"experiment": "launcher", "ablations": [{"name": "row", "baseline": True}],
             "launcher": {"name": name, name: dict(settings)}}
    return validate(probe, "launcher settings")["launcher"]


def stage_settings(section: Mapping[str, Any], launcher: str, stage: str | None) -> dict[str, Any]:
    """Settings of ``launcher`` for ``stage`` from a validated ``launcher:`` section:
    ``section[launcher]``, and for ``slurm`` ``section["stages"][stage]`` on top (e.g. more GPUs and
    time for pretraining than for the linear probe); unset (``None``) settings left out."""
    settings = dict(section.get(launcher) or {})
    if launcher == "slurm" and stage:
        settings = runconfig.deep_merge(settings, (section.get("stages") or {}).get(stage) or {})
    return {k: v for k, v in settings.items() if v is not None}


def processes(launcher: str, settings: Mapping[str, Any]) -> int:
    """The processes a job with these settings runs: ``nodes`` x ``tasks_per_node`` (default:
    ``gpus_per_node``, one DDP process per GPU, else 1); the debug launcher runs one."""
    if launcher == "debug":
        return 1
    tasks = settings.get("tasks_per_node") or settings.get("gpus_per_node") or 1
    return int(tasks) * int(settings.get("nodes", 1) if launcher == "slurm" else 1)


def stage_world(cfg: Mapping, stage: str) -> int:
    """The processes ``stage``'s job gets from a validated pipeline config's launcher settings."""
    launcher = cfg["launcher"]
    return processes(launcher["name"], stage_settings(launcher, launcher["name"], stage))


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
    ``check_paths=False`` skips the dataset-folder checks.
    """
    cfg = validate(cfg, source)
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
            run_cfg = runconfig.resolve(overrides=row.overrides, base=base, world=stage_world(cfg, PRETRAIN),
                                        stages=planned)
        except ConfigError as err:
            raise ConfigError(f"{where}: {str(err).removeprefix('config: ')}") from None
        if check_paths:
            check_data(run_cfg, cfg["stages"], where)
        resolved[row.name] = run_cfg
    return Pipeline(cfg, rows, resolved)


def read(path: str | Path, **kwargs: Any) -> Pipeline:
    """:func:`load` of the pipeline config in file ``path``."""
    return load(runconfig.load_yaml(path), source=f"pipeline config {path}", **kwargs)


# ----------------------------------------------------------------------- Snakemake profile guard
def profiles_in_use(argv: Sequence[str], env_profile: str | None) -> list[str]:
    """Names of the Snakemake profiles a run was started with (``--profile NAME`` or a path to it,
    else ``$SNAKEMAKE_PROFILE``); Snakemake does not tell the workflow, so they are read from argv."""
    given = []
    for i, arg in enumerate(argv):
        if arg == "--profile" and i + 1 < len(argv):
            given.append(argv[i + 1])
        elif arg.startswith("--profile="):
            given.append(arg.split("=", 1)[1])
    if not given and env_profile:
        given.append(env_profile)
    paths = [Path(value) for value in given]
    return [path.parent.name if path.suffix in (".yaml", ".yml") else path.name for path in paths]


def check_slurm_profile(argv: Sequence[str], env_profile: str | None, config_settings: Mapping | None) -> None:
    """Stop when ``--profile slurm`` is in use but its ``config:`` did not reach the workflow: a
    ``--config`` on the command line replaces the profile's whole ``config:`` entry, and with it
    ``launcher.name: slurm`` (every stage would run on this host) and the cluster settings."""
    if "slurm" in profiles_in_use(argv, env_profile) and "launcher" not in (config_settings or {}):
        raise ConfigError(
            "--profile slurm is in use, but its `config:` (launcher.name: slurm and your cluster settings) "
            "did not reach the workflow: a --config given on the command line replaces the profile's whole "
            "`config:` entry, so stages would run on this host or without your cluster settings. Put those "
            "--config values in the profile's `config:` (slurm/profile.yaml) instead, or give the launcher "
            "settings in --config too, e.g. launcher='{name: slurm, slurm: {partition: gpu}}' (README.md, SLURM)."
        )
