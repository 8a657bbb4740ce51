"""The job wrapper: one stage of one row and seed, from its resolved config to its marker.

:func:`run_stage` (what ``ftcl stage`` runs, on the host that plans) writes the stage's resolved
config to ``<run>/configs/<stage>.yaml``, keeps, resumes or moves aside the stage's folder
(:mod:`ftcl.orchestrate.folders`), submits a :class:`StageJob` through the launcher unless the result
for these settings is already there, waits for it, and writes ``<run>/<stage>.done``.

:class:`StageJob` is what runs in the job (a submitit ``Checkpointable``: requeued as it is on
preemption or time-out, and the stage resumes from its checkpoint): it reads the resolved config,
checks only its digest and that the job has the processes the config was checked for, and runs the
stage (:func:`ftcl.stages.in_run_folder`).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import submitit

from ftcl.config import ConfigError, resolved
from ftcl.errors import USER_ERRORS
from ftcl.orchestrate import folders, launcher
from ftcl.pipeline import processes


class StageJob(submitit.helpers.Checkpointable):
    """``stage`` of the run folder ``run_dir``, run inside a submitit job (module docstring)."""

    def __init__(self, stage: str, run_dir: str | Path, launcher_name: str, cpus_per_task: int | None = None):
        self.stage, self.run_dir = stage, str(run_dir)
        self.launcher, self.cpus_per_task = launcher_name, cpus_per_task

    def __call__(self) -> int:
        os.environ["FTCL_LAUNCHER"] = self.launcher  # the tracker tags runs with it (and SLURM_JOB_ID)
        if self.cpus_per_task:
            _limit_threads(self.cpus_per_task)
        if self.launcher != "debug":
            _export_distributed_env()
        from ftcl import stages

        try:
            cfg, world = resolved.read(folders.config_path(self.run_dir, self.stage))
            actual = int(os.environ.get("WORLD_SIZE", "1"))
            if actual != world:
                raise ConfigError(f"{self.stage}: the job has {actual} process(es), but its config was checked for "
                                  f"{world}: plan again with the launcher settings the job runs with")
            stages.in_run_folder(self.stage, self.run_dir)(cfg)
        except USER_ERRORS as err:  # a message for the user, not a traceback
            raise launcher.StageFailed(f"{type(err).__name__}: {err}") from None
        return 0

    def checkpoint(self) -> submitit.helpers.DelayedSubmission:
        """Called by submitit on preemption or time-out, before it requeues the job and exits."""
        print(f"ftcl stage: job interrupted; requeueing {self.stage} of {self.run_dir} "
              "(a resumable stage continues from its last checkpoint)", flush=True)
        return submitit.helpers.DelayedSubmission(self)

    def __repr__(self) -> str:
        return f"StageJob({self.stage}, {self.run_dir}, launcher={self.launcher})"


def _limit_threads(cpus: int) -> None:
    """Use the CPUs the job was given, not every core of the node."""
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(var, str(cpus))
    if "torch" in sys.modules:  # already imported (debug launcher): environment variables come too late
        sys.modules["torch"].set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


def _export_distributed_env() -> None:
    """Export ``MASTER_ADDR``/``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` when the job has several tasks."""
    env = submitit.JobEnvironment()
    if env.num_tasks > 1:
        # every task sees all GPUs of its node and picks cuda:LOCAL_RANK (the torchrun convention)
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)


def run_stage(stage: str, run_dir: str | Path, text: str, launcher_name: str, settings: Mapping[str, Any],
              job_dir: str | Path, log_path: str | Path | None = None) -> int:
    """``stage`` of ``run_dir`` with the resolved config ``text`` (:mod:`ftcl.config.resolved`) through
    ``launcher_name`` with ``settings``; returns the exit status of ``ftcl stage`` (0: its marker is
    written)."""
    run_dir = Path(run_dir)
    cfg, world = resolved.parse(text, f"the {stage} config")
    jobs = processes(launcher_name, settings)
    if jobs != world:
        raise ConfigError(f"{stage}: the launcher gives the job {jobs} process(es), but the config was checked for "
                          f"{world}: resolve it for the launcher settings it runs with")
    config_file = folders.config_path(run_dir, stage)
    config_file.parent.mkdir(parents=True, exist_ok=True)
    config_file.write_text(text)
    with Path(log_path).open("a") if log_path else nullcontext() as log:
        prepared = folders.prepare(run_dir, stage, cfg, log)
        if prepared.state == "done":
            folders.note(f"{stage}: {prepared.folder} already holds this stage's result for these settings; "
                         "nothing to run", log)
        else:
            if prepared.state == "resume":
                folders.note(f"{stage}: continuing the unfinished work in {prepared.folder}", log)
            if launcher_name == "slurm":
                settings = {"name": f"ftcl-{stage}", **settings}
            job = launcher.submit(StageJob(stage, run_dir, launcher_name, settings.get("cpus_per_task")),
                                  launcher_name, job_dir, settings)
            status = launcher.wait_or_cancel(job, log, stage)
            if status != 0:
                return status
        marker = folders.finish(run_dir, stage, prepared)
        folders.note(f"{stage}: done -> {marker}", log)
        return 0
