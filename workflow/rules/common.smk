# Shared by all .smk files: the checked ablation rows, the resolved run config of each row and
# seed, the paths of the run folders, and the `ftcl submit` command that launches a stage.
#
# Every row is resolved here, while Snakemake parses the workflow, so a bad row (unknown key, bad
# value, repeated name, missing dataset) fails before any job is submitted, naming the row and key.
import copy
import hashlib
import json
import os
import re
import shlex
import shutil
import sys
from pathlib import Path

import yaml

from ftcl import config as runconfig
from ftcl import launch
from ftcl.aggregate import ablation_rows

STAGES = ("pretrain", "linear", "knn", "detection")
# run-config keys the pipeline sets for every run; rows and `defaults` may not set them
PIPELINE_KEYS = ("seed", "experiment", "tracking.uri", "tracking.artifact_root", "tracking.tags",
                 "tracking.parent_run_id", "tracking.run_name")
# what results/<experiment>/ holds besides the row folders
RESERVED_NAMES = ("tables", "plots", "logs", "pipeline.yaml", "mlflow_experiment.txt", "report.html")
# datasets without a default location (data.root must be set)
ROOT_REQUIRED = ("cifar10", "cifar100", "imagefolder")

RESULTS = config["results_dir"]
EXPERIMENT = config["experiment"]
EXP_DIR = f"{RESULTS}/{EXPERIMENT}"
SEEDS = config["seeds"]
RUN_DIR = f"{EXP_DIR}/{{row}}/seed{{seed}}"  # one folder per row and seed
RUN_CONFIG = f"{RUN_DIR}/config.yaml"
PIPELINE_CONFIG = f"{EXP_DIR}/pipeline.yaml"
MLFLOW_EXPERIMENT = f"{EXP_DIR}/mlflow_experiment.txt"


def stage_result(stage):
    """The file whose presence means ``stage`` is done for a row and seed (run-folder contract)."""
    return f"{RUN_DIR}/{stage}/{stage}.json"


def _pipeline_keys_in(overrides, where):
    for key in overrides:
        for fixed in PIPELINE_KEYS:
            if key == fixed or key.startswith(f"{fixed}.") or fixed.startswith(f"{key}."):
                raise runconfig.ConfigError(
                    f"{where}: key {key!r} is set by the pipeline for every run (seed from `seeds`, "
                    "experiment, tracking from the top-level `tracking`); remove it"
                )


def _check_dataset(run_cfg, where):
    """Fail early on a dataset folder that does not exist, without loading the data."""
    data = run_cfg["data"]
    if data["root"] is None and data["dataset"] in ROOT_REQUIRED:
        raise runconfig.ConfigError(
            f"{where}: key 'data.root' is not set; dataset {data['dataset']!r} needs the folder that holds it"
        )
    if data["root"] is not None and not Path(data["root"]).expanduser().exists():
        raise runconfig.ConfigError(
            f"{where}: key 'data.root' is {data['root']!r}, which does not exist; point it at your copy "
            f"of {data['dataset']}"
        )
    if data["class_list"] is not None and not Path(data["class_list"]).is_file():
        raise runconfig.ConfigError(
            f"{where}: key 'data.class_list' is {data['class_list']!r}, which is not a file"
        )


def row_description(row, overrides):
    """The parent run's description in the MLflow UI: the row's text and its own overrides."""
    text = (row.get("description") or "").strip()
    listed = ", ".join(f"{k}={json.dumps(v)}" for k, v in overrides.items()) or "none (the pipeline defaults)"
    return f"{text}\n\nrow overrides: {listed}".strip()


def check_rows(cfg):
    """The ablation rows by name, each with its resolved run config (seed still to set).

    Rows must have distinct, folder-safe names and exactly one baseline, a ``compare_to`` must name
    another row; each row's overrides must name known keys with valid values (checked against
    ftcl's run-config schema).
    """
    defaults = runconfig.flatten(cfg["defaults"])
    _pipeline_keys_in(defaults, "pipeline config defaults")
    runconfig.validate(runconfig.deep_merge(runconfig.defaults(), cfg["defaults"]), "pipeline config defaults")
    tracking = {
        "uri": cfg["tracking"]["uri"] or f"sqlite:///{cfg['results_dir']}/mlflow.db",
        "artifact_root": cfg["tracking"]["artifact_root"],
    }
    rows = {}
    for row in cfg["ablations"]:
        name = row["name"]
        where = f"ablation row {name!r}"
        if name in rows:
            raise runconfig.ConfigError(f"{where}: the name is used by two rows; row names must be unique")
        if name.startswith(".") or name in RESERVED_NAMES:
            raise runconfig.ConfigError(
                f"{where}: the name cannot be a row folder; avoid a leading '.' and the names "
                + ", ".join(RESERVED_NAMES)
            )
        overrides = runconfig.flatten(row["overrides"])
        runconfig.check_known_keys(overrides, where=where)
        _pipeline_keys_in(overrides, where)
        base = runconfig.deep_merge(
            cfg["defaults"],
            {"experiment": cfg["experiment"],
             "tracking": {**tracking, "tags": {"row": name, "description": row_description(row, overrides)}}},
        )
        try:
            resolved = runconfig.resolve(overrides=overrides, base=base)
        except runconfig.ConfigError as err:
            raise runconfig.ConfigError(f"{where}: {str(err).removeprefix('config: ')}") from None
        _check_dataset(resolved, where)
        rows[name] = resolved
    ablation_rows(cfg)  # every compare_to names another row
    baselines = [row["name"] for row in cfg["ablations"] if row["baseline"]]
    if len(baselines) != 1:
        raise runconfig.ConfigError(
            f"exactly one ablation row must have `baseline: true`; found {len(baselines)}"
            + (f" ({', '.join(map(repr, baselines))})" if baselines else "")
        )
    return rows


ROWS = check_rows(config)


wildcard_constraints:
    row="|".join(map(re.escape, ROWS)),
    seed=r"\d+",


def run_config_text(wildcards):
    """The resolved run config of a row and seed, as written to its config.yaml."""
    cfg = copy.deepcopy(ROWS[wildcards.row])
    cfg["seed"] = int(wildcards.seed)
    cfg["tracking"]["tags"]["seed"] = int(wildcards.seed)
    return yaml.safe_dump(cfg, sort_keys=False)


def digest(text):
    """A short fingerprint of a file's content: the value Snakemake's params rerun trigger compares."""
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def pipeline_config_text():
    """The validated pipeline config that aggregation reads (launcher settings left out: they do
    not change results, so switching launchers reruns nothing)."""
    return yaml.safe_dump({k: v for k, v in config.items() if k != "launcher"}, sort_keys=False)


def tracking_settings():
    """The run configs' tracking section (the same for every row: rows may not change it)."""
    return next(iter(ROWS.values()))["tracking"]


def create_mlflow_experiment(marker):
    """Create the MLflow store and the experiment before any stage job starts: stage jobs that
    start together would otherwise race to create a new sqlite store."""
    from mlflow.tracking import MlflowClient

    from ftcl import tracking

    settings = tracking_settings()
    if not settings["enabled"]:
        Path(marker).write_text("tracking disabled\n")
        return
    uri = tracking.tracking_uri(settings["uri"])
    if uri.startswith("sqlite:///"):
        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    root = tracking.artifact_root(settings["artifact_root"], uri, EXPERIMENT)
    experiment_id = tracking.get_or_create_experiment(MlflowClient(uri), EXPERIMENT, root)
    Path(marker).write_text(f"{uri}\nexperiment {EXPERIMENT} (id {experiment_id})\n")


def requested_results():
    """Every stage result the config asks for, for every row and seed."""
    return expand(stage_result("{stage}"), stage=config["stages"], row=list(ROWS), seed=SEEDS)


def find_ftcl():
    """The `ftcl` on PATH (a rule's conda environment, with --sdm conda, comes first), else the one
    installed beside the Python running Snakemake (e.g. `.venv/bin/snakemake` without activation)."""
    found = shutil.which("ftcl")
    if found:
        return "ftcl"
    beside = Path(sys.executable).with_name("ftcl")
    if beside.is_file():
        return str(beside)
    raise WorkflowError(
        "the `ftcl` command is not on PATH nor beside this Python: run `bash install.sh`, then "
        "`.venv/bin/snakemake ...` (or activate the environment ftcl is installed in)"
    )


def profiles_in_use():
    """Names of the Snakemake profiles this run was started with (--profile NAME or a path to it,
    else $SNAKEMAKE_PROFILE); Snakemake does not tell the workflow, so they are read from argv."""
    argv, given = sys.argv[1:], []
    for i, arg in enumerate(argv):
        if arg == "--profile" and i + 1 < len(argv):
            given.append(argv[i + 1])
        elif arg.startswith("--profile="):
            given.append(arg.split("=", 1)[1])
    from_env = os.environ.get("SNAKEMAKE_PROFILE")
    if not given and from_env:
        given.append(from_env)
    paths = [Path(value) for value in given]
    return [path.parent.name if path.suffix in (".yaml", ".yml") else path.name for path in paths]


def check_slurm_profile():
    """Stop when `--profile slurm` is in use but its `config:` did not reach the workflow: a --config
    on the command line replaces the profile's whole `config:` entry, and with it launcher.name:
    slurm (every stage would run on this host) and the cluster settings."""
    if "slurm" in profiles_in_use() and "launcher" not in (workflow.config_settings.config or {}):
        raise WorkflowError(
            "--profile slurm is in use, but its `config:` (launcher.name: slurm and your cluster settings) "
            "did not reach the workflow: a --config given on the command line replaces the profile's whole "
            "`config:` entry, so stages would run on this host or without your cluster settings. Put those "
            "--config values in the profile's `config:` (slurm/profile.yaml) instead, or give the launcher "
            "settings in --config too, e.g. launcher='{name: slurm, slurm: {partition: gpu}}' (README.md, SLURM)."
        )


FTCL = find_ftcl()
# Nested --config values, and so a profile's `config:` (--profile slurm), reach the workflow as text
# ('8', 'True'): the launcher settings get their types back.
config["launcher"] = launch.settings_from_text(config["launcher"])
LAUNCHER = config["launcher"]["name"]
check_slurm_profile()


class Unrecorded:
    """A rule param that reaches the shell command as text but that Snakemake's params rerun
    trigger does not record (it records plain values only)."""

    def __init__(self, text):
        self.text = text

    def __str__(self):
        return self.text

    def __repr__(self):
        return "Unrecorded(...)"  # constant, should Snakemake ever record it


def submit_command(stage):
    """``ftcl submit --launcher NAME --stage STAGE --option KEY=VALUE ...`` for ``stage``, used in
    the stage rules as {params.submit}. Unrecorded: changing launcher settings (or switching
    launchers, e.g. with --profile slurm) reruns nothing that has finished."""
    settings = launch.stage_settings(config["launcher"], LAUNCHER, stage)
    args = [FTCL, "submit", "--launcher", LAUNCHER, "--stage", stage]
    for key, value in runconfig.flatten(settings).items():
        args += ["--option", f"{key}={json.dumps(value)}"]
    return Unrecorded(shlex.join(args))


SUBMIT = {stage: submit_command(stage) for stage in STAGES}
# Snakemake threads of a stage: the CPUs its job uses here (local and debug launchers); a job on
# SLURM uses none of this machine's CPUs.
THREADS = {
    stage: config["launcher"].get(LAUNCHER, {}).get("cpus_per_task", 1) if LAUNCHER != "slurm" else 1
    for stage in STAGES
}
