"""Launch one ``ftcl`` sub-command as a submitit job, follow its logs, and report how it ended.

``ftcl submit --launcher local --stage pretrain --job-dir DIR -- pretrain --config F --out D``
submits ``ftcl pretrain --config F --out D`` as a job and waits for it. Three launchers:

* ``local``: submitit's ``LocalExecutor``, a separate process on this machine (the default, so the
  pipeline always goes through the same submission path as on a cluster);
* ``debug``: submitit's ``DebugExecutor``, in this process (for stepping through with a debugger);
* ``slurm``: submitit's ``AutoExecutor(cluster="slurm")``: partition, account, qos, constraint,
  GPUs, CPUs, memory, time, per-stage settings (``launcher.stages.<stage>`` of the pipeline config).

The job is a :class:`submitit.helpers.Checkpointable`: on preemption or time-out (SIGUSR2) submitit
requeues it with the same arguments, and ``ftcl pretrain`` and ``ftcl detect`` resume from
``<out>/checkpoints/last.pt``. With more than one task (``tasks_per_node`` = GPUs per node by default)
the job exports the ``torch.distributed`` ``env://`` variables (``MASTER_ADDR``, ``RANK``,
``LOCAL_RANK``, ...; every task sees all GPUs of its node, as under ``torchrun``).

While waiting, the job's own stdout/stderr lines are streamed (to ``--log FILE`` or stdout); the job
id and the log paths go to stderr. A failed job makes ``ftcl submit`` exit with status 1 after
printing the job's Python error and its log paths.
"""

from __future__ import annotations

import argparse
import collections
import os
import shlex
import signal
import sys
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TextIO

import submitit
import yaml
from submitit.core.utils import FailedJobError, JobPaths, UncompletedJobError, pickle_load
from submitit.local.debug import DebugJob

from ftcl.config import ConfigError, deep_merge, dotted_to_nested, load_yaml, parse_override

LAUNCHERS = ("local", "debug", "slurm")

#: settings every launcher accepts, with their type (submitit's generic parameters)
_COMMON: dict[str, type | tuple[type, ...]] = {
    "name": str,
    "timeout_min": int,
    "cpus_per_task": int,
    "gpus_per_node": int,
    "tasks_per_node": int,
}
#: the settings each launcher accepts (anything else is rejected, naming the key)
SETTINGS: dict[str, dict[str, type | tuple[type, ...]]] = {
    "debug": {"name": str, "cpus_per_task": int},
    "local": {**_COMMON, "signal_delay_s": int, "max_num_timeout": int},
    "slurm": {
        **_COMMON,
        "nodes": int,
        "mem_gb": (int, float),
        "partition": str,
        "account": str,
        "qos": str,
        "constraint": str,
        "exclude": str,
        "array_parallelism": int,
        "signal_delay_s": int,
        "max_num_timeout": int,
        "additional_parameters": dict,
        "setup": list,
    },
}
#: defaults applied under the user's settings
DEFAULTS: dict[str, dict[str, Any]] = {
    "debug": {},
    "local": {"timeout_min": 7 * 24 * 60, "gpus_per_node": 0},
    "slurm": {"timeout_min": 600, "nodes": 1, "gpus_per_node": 1, "cpus_per_task": 8},
}
#: slurm settings that are not submitit generic parameters: passed on as ``slurm_<key>``
_SLURM_SPECIFIC = ("partition", "account", "qos", "constraint", "exclude", "array_parallelism",
                   "signal_delay_s", "additional_parameters", "setup")

POLL_S = 1.0  #: how often the log files and the job state are looked at
STATE_CHECK_S = 20.0  #: how often the scheduler is asked for the job state (sacct on SLURM)


class StageFailed(RuntimeError):
    """The ``ftcl`` sub-command in the job returned a non-zero exit status."""


# --------------------------------------------------------------------------- settings


def check_settings(launcher: str, settings: Mapping[str, Any], where: str = "launcher") -> dict[str, Any]:
    """Check ``settings`` for ``launcher``: known keys, right types; ``None`` means unset (dropped)."""
    if launcher not in SETTINGS:
        raise ConfigError(f"{where}: unknown launcher {launcher!r}; choose one of {', '.join(LAUNCHERS)}")
    allowed = SETTINGS[launcher]
    checked: dict[str, Any] = {}
    for key, value in settings.items():
        if key not in allowed:
            raise ConfigError(
                f"{where}: unknown {launcher} setting {key!r}; allowed: {', '.join(sorted(allowed))}"
            )
        if value is None:
            continue
        want = allowed[key]
        if isinstance(value, bool) or not isinstance(value, want):
            names = " or ".join(t.__name__ for t in (want if isinstance(want, tuple) else (want,)))
            raise ConfigError(f"{where}: {launcher} setting {key!r} is {value!r}; expected {names}")
        checked[key] = value
    return checked


def stage_settings(section: Mapping[str, Any], launcher: str, stage: str | None) -> dict[str, Any]:
    """Settings of ``launcher`` for ``stage`` from a pipeline config's ``launcher:`` section.

    ``section[launcher]`` applies to every stage; for ``slurm``, ``section["stages"][stage]`` overrides
    it for one stage (e.g. more GPUs and time for pretraining than for the linear probe).
    """
    settings = dict(section.get(launcher) or {})
    where = f"launcher.{launcher}"
    if launcher == "slurm" and stage and (section.get("stages") or {}).get(stage):
        check_settings(launcher, section["stages"][stage], f"launcher.stages.{stage}")
        settings = deep_merge(settings, section["stages"][stage])
        where = f"launcher.slurm + launcher.stages.{stage}"
    return check_settings(launcher, settings, where)


_NULL_TEXT = ("None", "null")
_BOOL_TEXT = {"True": True, "true": True, "False": False, "false": False}


def _from_text(value: Any, want: type | tuple[type, ...]) -> Any:
    """``value`` read back from text when it is text but the setting is not (``"8"`` -> 8)."""
    if not isinstance(value, str):
        return value
    if value in _NULL_TEXT:
        return None
    if want is str or want in (dict, list):
        return value
    try:
        parsed = yaml.safe_load(value)
    except yaml.YAMLError:
        return value
    return parsed if isinstance(parsed, want) else value  # anything else is reported by check_settings


def settings_from_text(section: Mapping[str, Any]) -> dict[str, Any]:
    """A pipeline config's ``launcher:`` section with settings that arrived as text given their types.

    Snakemake hands nested ``--config`` values, and with them a profile's ``config:`` (e.g.
    ``snakemake --profile slurm``), to the workflow as text: ``'8'``, ``'True'``, ``'None'``. Settings
    that are numbers or booleans are read back as YAML, ``'None'``/``'null'`` mean unset, and the
    values of ``additional_parameters`` get their booleans back (sbatch flags); text settings stay text.
    """
    out = dict(section)

    def retype(launcher: str, settings: Any) -> Any:
        if not isinstance(settings, Mapping):
            return settings
        allowed = SETTINGS[launcher]
        typed = {key: _from_text(value, allowed.get(key, str)) for key, value in settings.items()}
        if isinstance(typed.get("additional_parameters"), Mapping):
            typed["additional_parameters"] = {
                k: _BOOL_TEXT.get(v, v) if isinstance(v, str) else v
                for k, v in typed["additional_parameters"].items() if not (isinstance(v, str) and v in _NULL_TEXT)
            }
        return typed

    for launcher in LAUNCHERS:
        if launcher in out:
            out[launcher] = retype(launcher, out[launcher])
    if isinstance(out.get("stages"), Mapping):
        out["stages"] = {stage: retype("slurm", settings) for stage, settings in out["stages"].items()}
    return out


def parse_options(options: Sequence[str]) -> dict[str, Any]:
    """``["partition=gpu", "additional_parameters.gres=gpu:1"]`` -> nested settings (values read as YAML)."""
    return dotted_to_nested(dict(parse_override(o) for o in options))


def launcher_section(path: str | Path) -> dict[str, Any]:
    """The ``launcher:`` section of a pipeline config file, or the whole file when it is the section."""
    data = load_yaml(path)
    section = data.get("launcher", data)
    if not isinstance(section, Mapping):
        raise ConfigError(f"{path}: 'launcher' must be a mapping of launcher settings")
    return dict(section)


# --------------------------------------------------------------------------- the job


class FtclJob(submitit.helpers.Checkpointable):
    """``ftcl <argv>`` run inside a submitit job; requeued as is on preemption or time-out.

    Requeueing resubmits the same arguments; a resumable stage (``ftcl pretrain``, ``ftcl detect``) then continues
    from its last checkpoint and its MLflow run (``<out>/.mlflow_run_id``).
    """

    def __init__(self, argv: Sequence[str], launcher: str, cpus_per_task: int | None = None):
        self.argv = list(argv)
        self.launcher = launcher
        self.cpus_per_task = cpus_per_task
        self._requeueing = False

    def __call__(self) -> int:
        self._requeueing = False
        os.environ["FTCL_LAUNCHER"] = self.launcher  # the tracker tags runs with it (and SLURM_JOB_ID)
        if self.cpus_per_task:
            _limit_threads(self.cpus_per_task)
        if self.launcher != "debug":
            _export_distributed_env()
        from ftcl.cli import main

        stderr = _RecentLines(sys.stderr)
        sys.stderr = stderr
        try:
            status = main(self.argv)
        except SystemExit as exit_:
            if self._requeueing:  # submitit exits the job after requeueing it: let that exit through
                raise
            # argparse errors and --help
            status = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
        finally:
            sys.stderr = stderr.stream
        if status:
            said = "\n".join(stderr.lines) or "(nothing on stderr)"
            raise StageFailed(f"`ftcl {shlex.join(self.argv)}` exited with status {status}:\n{said}")
        return 0

    def checkpoint(self) -> submitit.helpers.DelayedSubmission:
        """Called by submitit on preemption or time-out, before it requeues the job and exits."""
        self._requeueing = True
        print(f"ftcl submit: job interrupted; requeueing `ftcl {shlex.join(self.argv)}` "
              "(a resumable stage continues from its last checkpoint)", flush=True)
        return submitit.helpers.DelayedSubmission(self)

    def __repr__(self) -> str:
        return f"FtclJob(ftcl {shlex.join(self.argv)}, launcher={self.launcher})"


class _RecentLines:
    """A text stream that passes writes on to ``stream`` and keeps the last few lines written."""

    def __init__(self, stream: TextIO, keep: int = 10):
        self.stream = stream
        self.lines: collections.deque[str] = collections.deque(maxlen=keep)
        self._partial = ""

    def write(self, text: str) -> int:
        *complete, self._partial = (self._partial + text).split("\n")
        self.lines.extend(line for line in complete if line.strip())
        return self.stream.write(text)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stream, name)


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


# --------------------------------------------------------------------------- submitting


def make_executor(launcher: str, job_dir: str | Path, settings: Mapping[str, Any]) -> Any:
    """A submitit executor for ``launcher`` with ``settings`` (checked with :func:`check_settings`)."""
    settings = {**DEFAULTS[launcher], **check_settings(launcher, settings)}
    job_dir = Path(job_dir)
    if launcher == "debug":
        return submitit.DebugExecutor(job_dir)
    if settings.get("gpus_per_node") and "tasks_per_node" not in settings:
        settings["tasks_per_node"] = settings["gpus_per_node"]  # one DDP process per GPU
    if launcher == "local":
        executor = submitit.LocalExecutor(job_dir, max_num_timeout=settings.pop("max_num_timeout", 3))
        settings.pop("name", None)
        settings.pop("cpus_per_task", None)  # the job limits its threads to it (FtclJob)
        executor.update_parameters(**settings)
        return executor
    executor = submitit.AutoExecutor(job_dir, cluster="slurm",
                                     slurm_max_num_timeout=settings.pop("max_num_timeout", 3))
    params = {(f"slurm_{k}" if k in _SLURM_SPECIFIC else k): v for k, v in settings.items()}
    executor.update_parameters(**params)
    return executor


def submit(
    argv: Sequence[str], launcher: str, job_dir: str | Path, settings: Mapping[str, Any] | None = None
) -> Any:
    """Submit ``ftcl <argv>`` and return the submitit job (not waiting for it)."""
    settings = dict(settings or {})
    executor = make_executor(launcher, job_dir, settings)
    return executor.submit(FtclJob(argv, launcher, settings.get("cpus_per_task")))


def submit_callable(fn: Callable[[], Any], launcher: str, job_dir: str | Path,
                    settings: Mapping[str, Any] | None = None) -> Any:
    """Submit any picklable callable with the same executors (e.g. for a quick check of a launcher)."""
    return make_executor(launcher, job_dir, settings or {}).submit(fn)


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
    print(f"ftcl submit: {message}", file=sys.stderr, flush=True)
    if log is not None and log is not sys.stdout:
        log.write(f"ftcl submit: {message}\n")
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


# --------------------------------------------------------------------------- command line

EPILOG = """\
settings (--option KEY=VALUE, or the launcher: section of --launcher-config):
  local: timeout_min, cpus_per_task (threads of the job), gpus_per_node, tasks_per_node,
         signal_delay_s, max_num_timeout
  debug: cpus_per_task
  slurm: partition, account, qos, constraint, exclude, nodes, gpus_per_node,
         tasks_per_node (default: gpus_per_node, one DDP process per GPU), cpus_per_task, mem_gb,
         timeout_min, array_parallelism, signal_delay_s, max_num_timeout, name,
         additional_parameters.KEY (any sbatch option), setup (shell lines run before the job)
  Values are read as YAML. A --launcher-config file is a pipeline config (its launcher: section is
  used: launcher.<name>, and for slurm launcher.stages.<stage> on top) or such a section alone.

examples:
  ftcl submit --job-dir results/jobs -- pretrain --config cfg.yaml --out runs/a
  ftcl submit --launcher slurm --stage pretrain --job-dir logs/%j -o partition=gpu -o gpus_per_node=4 \\
      -o timeout_min=2880 -- pretrain --config cfg.yaml --out runs/a
  ftcl submit --launcher-config config/config.yaml --stage linear --job-dir logs \\
      -- linear --config cfg.yaml --checkpoint runs/a --out runs/a-linear
"""


def register_cli(subparsers: argparse._SubParsersAction) -> None:
    """Add ``ftcl submit``."""
    p = subparsers.add_parser(
        "submit",
        help="run an ftcl sub-command as a submitit job (local, debug or SLURM) and wait for it",
        description="Submit `ftcl COMMAND ...` as a submitit job, print the job id and its log paths, "
        "stream its log lines while waiting, and exit 0 when it succeeded, 1 with the job's error when "
        "it failed. Preempted or timed-out jobs are requeued; `ftcl pretrain` resumes from its last "
        "checkpoint.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_submit_options(p)
    p.add_argument("--stage", default=None,
                   help="stage name: selects launcher.stages.STAGE settings and names the job "
                   "(default: the sub-command)")
    p.add_argument("job_argv", nargs=argparse.REMAINDER, metavar="-- COMMAND ...",
                   help="the ftcl sub-command to run and its arguments")
    p.set_defaults(func=cmd_submit)


def add_submit_options(p: argparse.ArgumentParser) -> None:
    """The launcher options of ``ftcl submit`` (also taken by ``ftcl stage``)."""
    p.add_argument("--launcher", choices=LAUNCHERS, default=None,
                   help="local: a process on this machine (default); debug: in this process; "
                   "slurm: a SLURM job (default: launcher.name of --launcher-config, else local)")
    p.add_argument("--launcher-config", type=Path, metavar="FILE",
                   help="pipeline config (or its launcher: section) holding the launcher settings")
    p.add_argument("--job-dir", type=Path, required=True, metavar="DIR",
                   help="folder for the job's submission files and stdout/stderr logs (%%j = job id)")
    p.add_argument("--option", "-o", action="append", default=[], metavar="KEY=VALUE",
                   help="one launcher setting, overriding --launcher-config (repeatable; see below)")
    p.add_argument("--log", type=Path, metavar="FILE",
                   help="append the job's streamed log lines to FILE instead of printing them")


def run_submitted(command: Sequence[str], args: argparse.Namespace, stage: str | None = None) -> int:
    """Submit ``ftcl COMMAND`` with the launcher options in ``args`` (:func:`add_submit_options`),
    stream its logs, wait; the exit status of ``ftcl submit``."""
    if not command:
        raise ConfigError("ftcl submit needs the sub-command to run after --, e.g. -- pretrain --config F --out D")
    section = launcher_section(args.launcher_config) if args.launcher_config else {}
    launcher = args.launcher or section.get("name") or "local"
    if launcher not in LAUNCHERS:
        raise ConfigError(f"{args.launcher_config}: launcher.name {launcher!r} is not one of {', '.join(LAUNCHERS)}")
    stage = stage or command[0]
    settings = stage_settings(section, launcher, stage)
    settings = check_settings(launcher, deep_merge(settings, parse_options(args.option)), "--option")
    if launcher == "slurm":
        settings.setdefault("name", f"ftcl-{stage}")
    job = submit(list(command), launcher, args.job_dir, settings)
    if args.log is None:
        return wait_or_cancel(job, None, stage)
    args.log.parent.mkdir(parents=True, exist_ok=True)
    with args.log.open("a") as log:
        return wait_or_cancel(job, log, stage)


def cmd_submit(args: argparse.Namespace) -> int:
    command = list(args.job_argv)
    if command[:1] == ["--"]:
        command = command[1:]
    return run_submitted(command, args, args.stage)
