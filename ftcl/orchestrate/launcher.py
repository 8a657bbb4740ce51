"""Submit a job through submitit and follow it: the one place that knows launchers.

Three launchers (``launcher.name`` of a pipeline config; settings typed in its schema,
``ftcl/resources/pipeline.schema.yaml``):

* ``local``: submitit's ``LocalExecutor``, a separate process on this machine (the default, so the
  pipeline always goes through the same submission path as on a cluster);
* ``debug``: submitit's ``DebugExecutor``, in this process (for stepping through with a debugger);
* ``slurm``: submitit's ``AutoExecutor(cluster="slurm")``: partition, account, qos, constraint,
  GPUs, CPUs, memory, time, per-stage settings (``launcher.stages.<stage>``).

A job is a :class:`submitit.helpers.Checkpointable` (:class:`ftcl.orchestrate.job.StageJob`): on
preemption or time-out (SIGUSR2) submitit requeues it, and the stage resumes from its checkpoint.
While waiting, :func:`follow` streams the job's own stdout/stderr lines (to a log file or stdout); the
job id and the log paths go to stderr; a failed job's error is reported with its log paths.
"""

from __future__ import annotations

import signal
import sys
import time
import traceback
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TextIO

import submitit
from submitit.core.utils import FailedJobError, JobPaths, UncompletedJobError, pickle_load
from submitit.local.debug import DebugJob

#: slurm settings that are not submitit generic parameters: passed on as ``slurm_<key>``
_SLURM_SPECIFIC = ("partition", "account", "qos", "constraint", "exclude", "array_parallelism",
                   "signal_delay_s", "additional_parameters", "setup")


class StageFailed(RuntimeError):
    """The stage in the job failed with an error a user can fix (its message, not a traceback)."""


def make_executor(launcher: str, job_dir: str | Path, settings: Mapping[str, Any]) -> Any:
    """A submitit executor for ``launcher`` with (validated) ``settings``."""
    settings, job_dir = dict(settings), Path(job_dir)
    if launcher == "debug":
        return submitit.DebugExecutor(job_dir)
    if settings.get("gpus_per_node") and "tasks_per_node" not in settings:
        settings["tasks_per_node"] = settings["gpus_per_node"]  # one DDP process per GPU
    max_num_timeout = settings.pop("max_num_timeout", 3)
    if launcher == "local":
        executor = submitit.LocalExecutor(job_dir, max_num_timeout=max_num_timeout)
        settings.pop("cpus_per_task", None)  # the job limits its threads to it (StageJob)
        executor.update_parameters(**settings)
        return executor
    executor = submitit.AutoExecutor(job_dir, cluster="slurm", slurm_max_num_timeout=max_num_timeout)
    executor.update_parameters(**{(f"slurm_{k}" if k in _SLURM_SPECIFIC else k): v for k, v in settings.items()})
    return executor


def submit(job: Any, launcher: str, job_dir: str | Path, settings: Mapping[str, Any] | None = None) -> Any:
    """Submit the picklable callable ``job`` and return the submitit job (not waiting for it)."""
    return make_executor(launcher, job_dir, settings or {}).submit(job)


POLL_S = 1.0  #: how often the log files and the job state are looked at
STATE_CHECK_S = 20.0  #: how often the scheduler is asked for the job state (sacct on SLURM)


# --------------------------------------------------------------------------- following


class _LogTail:
    """Print the lines appended to a job's log files since the last call."""

    def __init__(self, paths: Sequence[Path], out: TextIO):
        self.offsets = {Path(p): 0 for p in paths}
        self.partial = {Path(p): "" for p in paths}
        self.out = out

    def poll(self, final: bool = False) -> None:
        for path, offset in self.offsets.items():
            try:
                with path.open("r", errors="replace") as f:
                    f.seek(offset)
                    text = f.read()
                    self.offsets[path] = f.tell()
            except FileNotFoundError:
                continue
            text = self.partial[path] + text
            lines = text.split("\n")
            self.partial[path] = "" if final else lines.pop()
            for line in lines:
                if line or not final:
                    self.out.write(line + "\n")
        self.out.flush()


def _note(message: str, log: TextIO | None) -> None:
    """A line about the job: on stderr, and in the log file when there is one."""
    print(f"ftcl stage: {message}", file=sys.stderr, flush=True)
    if log is not None and log is not sys.stdout:
        log.write(f"ftcl stage: {message}\n")
        log.flush()


def _result_files(job: Any) -> list[Path]:
    folder = job.paths.folder
    return [JobPaths(folder, job.job_id, task).result_pickle for task in range(job.num_tasks)]


def _results_written(job: Any, since: float) -> bool:
    return all(path.exists() and path.stat().st_mtime >= since for path in _result_files(job))


def _error_from_results(job: Any) -> FailedJobError | None:
    """The job's error (None when it succeeded), read from the result files its tasks wrote.

    Reading them directly spares the wait for the job's processes to exit (seconds with torch and
    MLflow loaded), which submitit's ``job.exception()`` would do first.
    """
    for task, path in enumerate(_result_files(job)):
        outcome, value = pickle_load(path)
        if outcome == "error":
            return FailedJobError(f"Job (task={task}) failed during processing with trace:\n"
                                  f"----------------------\n{value}\n----------------------")
    return None


def follow(job: Any, log: TextIO | None = None, stage: str = "job") -> int:
    """Wait for ``job`` while streaming its logs; 0 when it succeeded, 1 (after the error) when not."""
    out = log or sys.stdout
    paths = job.paths
    _note(f"{stage}: job {job.job_id} submitted; logs: {paths.stdout} and {paths.stderr}", log)
    if job.num_tasks > 1:
        _note(f"{stage}: {job.num_tasks} tasks; the logs of tasks 1.. sit beside task 0's in {paths.folder}", log)
    error: BaseException | None
    if isinstance(job, DebugJob):  # runs here, now; its prints go straight to this console
        error = job.exception()
    else:
        tail = _LogTail([paths.stdout, paths.stderr], out)
        last_check = time.monotonic()
        # local job ids are process ids, which repeat: only results newer than the submission count
        submitted_at = paths.submitted_pickle.stat().st_mtime
        while True:
            tail.poll()
            if _results_written(job, submitted_at):
                error = _error_from_results(job)
                break
            now = time.monotonic()
            force = now - last_check > STATE_CHECK_S
            if force:
                last_check = now
            if job.done(force_check=force):  # ended without results: killed, cancelled, out of memory
                error = job.exception()
                break
            time.sleep(POLL_S)
        tail.poll(final=True)
    if error is None:
        _note(f"{stage}: job {job.job_id} finished", log)
        return 0
    _report_failure(job, error, stage, log)
    return 1


def _report_failure(job: Any, error: BaseException, stage: str, log: TextIO | None) -> None:
    if isinstance(error, StageFailed):  # debug launcher: raised in this process
        text = str(error)
    elif isinstance(error, FailedJobError | UncompletedJobError):
        # the job's own trace (or, when it died, its stderr), as submitit read it back
        text = str(error)
        marker = f"{StageFailed.__name__}: "
        if marker in text:  # the command reported its error itself: its message, not a traceback
            text = text.split(marker, 1)[1].split("\n-----", 1)[0]
    else:
        text = "".join(traceback.format_exception(error))
    _note(f"{stage}: job {job.job_id} failed: {text.rstrip()}", log)
    _note(f"{stage}: logs: {job.paths.stdout} and {job.paths.stderr}", log)


def wait_or_cancel(job: Any, log: TextIO | None, stage: str) -> int:
    """:func:`follow`, cancelling the job when this process is interrupted (Ctrl-C, SIGTERM)."""

    def _terminate(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        return follow(job, log, stage)
    except KeyboardInterrupt:
        _note(f"{stage}: interrupted; cancelling job {job.job_id}", log)
        job.cancel(check=False)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
