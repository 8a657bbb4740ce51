# Shared by the .smk files: run-folder paths and the stage command line. What a row is, each row's
# resolved run config and what each stage's result depends on (its rerun trigger) come from
# ftcl/pipeline/; how a stage's folder is kept, resumed or moved aside and its job submitted from
# ftcl/orchestrate/ (`ftcl stage`).
#
# Every row is checked and resolved here, once, while Snakemake parses the workflow (for the process
# count the launcher gives each stage), so a bad row (unknown key, bad value, a batch the processes
# or BatchNorm sub-batches cannot share, a repeated name, a missing dataset, a folder outside the
# results) fails before any job.
import json
import os
import re
import shlex
import shutil
import sys
from pathlib import Path

from ftcl import pipeline
from ftcl.constants import STAGES
from ftcl.orchestrate import folders

pipeline.check_slurm_profile(sys.argv[1:], os.environ.get("SNAKEMAKE_PROFILE"), workflow.config_settings.config)
PIPE = pipeline.load(config)

EXP_DIR = str(PIPE.exp_dir)
RUN_DIR = f"{EXP_DIR}/{{row}}/seed{{seed}}"  # one folder per row and seed
PIPELINE_CONFIG = f"{EXP_DIR}/pipeline.yaml"
MLFLOW_EXPERIMENT = f"{EXP_DIR}/mlflow_experiment.txt"
LAUNCHER = PIPE.config["launcher"]["name"]


wildcard_constraints:
    row="|".join(map(re.escape, PIPE.row_names)),
    seed=r"\d+",


def stage_done(stage):
    """The marker `ftcl stage` writes when `stage` of a row and seed is done (run-folder contract)."""
    return str(folders.marker_path(RUN_DIR, stage))


def requested_results():
    """Every stage marker the config asks for, for every row and seed."""
    return expand(stage_done("{stage}"), stage=PIPE.stages, row=PIPE.row_names, seed=PIPE.seeds)


def find_ftcl():
    """The `ftcl` on PATH (a rule's conda environment, with --sdm conda, comes first), else the one
    installed beside the Python running Snakemake (e.g. `.venv/bin/snakemake` without activation)."""
    if shutil.which("ftcl"):
        return "ftcl"
    beside = Path(sys.executable).with_name("ftcl")
    if beside.is_file():
        return str(beside)
    raise WorkflowError(
        "the `ftcl` command is not on PATH nor beside this Python: run `bash install.sh`, then "
        "`.venv/bin/snakemake ...` (or activate the environment ftcl is installed in)"
    )


FTCL = find_ftcl()


class Unrecorded:
    """A rule param that reaches the shell command as text but that Snakemake's params rerun
    trigger does not record (it records plain values only)."""

    def __init__(self, text):
        self.text = text

    def __str__(self):
        return self.text

    def __repr__(self):
        return "Unrecorded(...)"  # constant, should Snakemake ever record it


def stage_command(stage):
    """``ftcl stage STAGE --launcher NAME --option KEY=VALUE ...``, used in the stage rule as
    {params.ftcl_stage}. Unrecorded: changing launcher settings (or switching launchers, e.g. with
    --profile slurm) reruns nothing that has finished."""
    settings = pipeline.stage_settings(PIPE.config["launcher"], LAUNCHER, stage)
    args = [FTCL, "stage", stage, "--launcher", LAUNCHER]
    for key, value in pipeline.runconfig.flatten(settings).items():
        args += ["--option", f"{key}={json.dumps(value)}"]
    return Unrecorded(shlex.join(args))


FTCL_STAGE = {stage: stage_command(stage) for stage in STAGES}
# Snakemake threads of a stage: the CPUs its job uses here (local and debug launchers); a job on
# SLURM uses none of this machine's CPUs.
THREADS = {
    stage: PIPE.config["launcher"][LAUNCHER].get("cpus_per_task", 1) if LAUNCHER != "slurm" else 1
    for stage in STAGES
}
