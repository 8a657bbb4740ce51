"""`ftcl submit`: stages run as submitit jobs (local and debug executors), their logs streamed,
their errors reported, preempted jobs requeued and resumed, and launcher settings turned into
SLURM parameters (without a cluster; tests/slurm/ runs them on one)."""

from __future__ import annotations

import functools
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from ftcl import launch
from ftcl.config import ConfigError

FTCL = str(Path(sys.executable).with_name("ftcl"))
TINY_RUN = {
    "device": "cpu",
    "data": {"dataset": "digits", "num_workers": 0},
    "model": {"width": 8, "small_stem": True, "feature_dim": 32},
    "method": {"queue_size": 256},
    "optim": {"epochs": 1, "batch_size": 64, "amp": False, "channels_last": False},
    "scores": {"histogram_every": 5},
    "log_every": 100,
}


def run_ftcl(*args: str, cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([FTCL, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout)


def write_run_config(folder: Path, **optim) -> Path:
    cfg = {**TINY_RUN, "optim": {**TINY_RUN["optim"], **optim},
           "tracking": {"uri": f"sqlite:///{folder / 'mlflow.db'}"}}
    path = folder / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """One real `ftcl pretrain` through the local launcher (shared by the tests that need a checkpoint)."""
    folder = tmp_path_factory.mktemp("submit")
    config = write_run_config(folder)
    proc = run_ftcl("submit", "--launcher", "local", "--job-dir", "jobs", "-o", "cpus_per_task=1",
                    "--", "pretrain", "--config", str(config), "--out", "run", cwd=folder)
    return folder, proc


def test_local_launcher_runs_a_stage_and_streams_its_logs(pretrained):
    folder, proc = pretrained
    assert proc.returncode == 0, proc.stderr
    assert (folder / "run" / "pretrain.json").is_file()
    match = re.search(r"pretrain: job (\d+) submitted; logs: (\S+) and (\S+)", proc.stderr)
    assert match, proc.stderr
    stdout_log, stderr_log = Path(match[2]), Path(match[3])
    assert stdout_log.parent == folder / "jobs" and stdout_log.is_file() and stderr_log.is_file()
    assert "[pretrain] done" in stdout_log.read_text()
    assert "[pretrain] done" in proc.stdout  # streamed while the job ran
    assert f"job {match[1]} finished" in proc.stderr


def test_local_job_is_tracked_with_its_launcher(pretrained):
    from mlflow.tracking import MlflowClient

    folder, _ = pretrained
    client = MlflowClient(f"sqlite:///{folder / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("ftcl").experiment_id])
    assert [r.data.tags["ftcl.launcher"] for r in runs] == ["local"]


def test_debug_launcher_runs_the_stage_in_process_and_logs_to_a_file(pretrained):
    folder, _ = pretrained
    proc = run_ftcl("submit", "--launcher", "debug", "--job-dir", "debug-jobs", "--log", "knn.log",
                    "--", "knn", "--checkpoint", "run", "--out", "knn", "--set", "tracking.enabled=false",
                    cwd=folder)
    assert proc.returncode == 0, proc.stderr
    assert (folder / "knn" / "knn.json").is_file()
    assert "[knn] top1" in proc.stdout  # in process: the stage prints straight to this console
    assert re.search(r"knn: job DEBUG_\d+ finished", (folder / "knn.log").read_text())


def test_a_failing_stage_fails_submit_with_its_own_error_and_log_paths(tmp_path):
    proc = run_ftcl("submit", "--job-dir", "jobs", "--", "pretrain", "--config", "missing.yaml", "--out", "run",
                    cwd=tmp_path)
    assert proc.returncode == 1
    assert "exited with status 2" in proc.stderr
    assert "config file missing.yaml does not exist" in proc.stderr  # the stage's message, from the job
    logs = re.search(r"logs: (\S+) and (\S+)", proc.stderr.split("failed:")[1])
    assert logs and Path(logs[1]).is_file() and Path(logs[2]).is_file()


def test_an_exception_in_a_job_is_reported_with_its_traceback(tmp_path, capsys):
    job = launch.submit_callable(functools.partial(int, "not-a-number"), "local", tmp_path)
    assert launch.follow(job, stage="check") == 1
    err = capsys.readouterr().err
    assert "check: job" in err and "failed" in err
    assert "Traceback" in err and "ValueError: invalid literal for int() with base 10: 'not-a-number'" in err


@pytest.mark.slow
def test_a_preempted_pretraining_is_requeued_and_resumes_from_its_checkpoint(tmp_path):
    config = write_run_config(tmp_path, epochs=8)
    job = launch.submit(["pretrain", "--config", str(config), "--out", str(tmp_path / "run")], "local",
                        tmp_path / "jobs", {"cpus_per_task": 1})
    last = tmp_path / "run" / "checkpoints" / "last.pt"
    while not last.exists() and not job.done():  # no deadline: a hang is pytest's timeout (pyproject.toml)
        time.sleep(0.1)
    assert last.exists(), job.stderr()
    controller = int(job.job_id)  # the local job's id is its controller's pid; the task is its child
    task = int(subprocess.check_output(["pgrep", "-P", str(controller)], text=True).split()[0])
    os.kill(task, signal.SIGUSR2)  # what SLURM sends before preempting or timing out a job
    assert launch.follow(job, stage="pretrain") == 0
    log = job.paths.stdout.read_text()
    assert "requeueing `ftcl pretrain" in log
    resumed = re.search(r"resumed from \S+ at epoch (\d+)/8", log)
    assert resumed and int(resumed[1]) >= 1, log
    assert "epoch 8/8" in log and (tmp_path / "run" / "pretrain.json").is_file()


def test_checkpoint_resubmits_the_same_command():
    job = launch.FtclJob(["pretrain", "--config", "c.yaml", "--out", "o"], "slurm")
    delayed = job.checkpoint()
    assert delayed.function is job and job.argv == ["pretrain", "--config", "c.yaml", "--out", "o"]


def test_the_exit_of_a_requeued_job_is_not_turned_into_a_failure(monkeypatch):
    job = launch.FtclJob(["pretrain"], "debug")

    def preempted_main(argv):
        job.checkpoint()
        sys.exit(144)  # what submitit does after requeueing a local job

    monkeypatch.setattr("ftcl.cli.main", preempted_main)
    with pytest.raises(SystemExit):
        job()


def test_slurm_settings_of_a_stage_become_sbatch_parameters(tmp_path):
    section = {
        "slurm": {"partition": "gpu", "account": "lab", "gpus_per_node": 1, "cpus_per_task": 8, "mem_gb": 32,
                  "timeout_min": 60, "additional_parameters": {"requeue": True}},
        "stages": {"pretrain": {"gpus_per_node": 4, "timeout_min": 2880}},
    }
    executor = launch.make_executor("slurm", tmp_path, launch.stage_settings(section, "slurm", "pretrain"))
    params = executor.parameters
    assert params["partition"] == "gpu" and params["account"] == "lab"
    assert params["gpus_per_node"] == 4 and params["ntasks_per_node"] == 4  # one DDP process per GPU
    assert params["time"] == 2880 and params["mem"] == "32GB" and params["cpus_per_task"] == 8
    assert params["additional_parameters"] == {"requeue": True}
    linear = launch.stage_settings(section, "slurm", "linear")
    assert linear["gpus_per_node"] == 1 and linear["timeout_min"] == 60


def test_unknown_or_mistyped_launcher_settings_are_rejected_by_name():
    with pytest.raises(ConfigError, match="unknown slurm setting 'partiton'"):
        launch.check_settings("slurm", {"partiton": "gpu"})
    with pytest.raises(ConfigError, match="launcher.stages.pretrain: slurm setting 'gpus_per_node' is '4'"):
        launch.stage_settings({"stages": {"pretrain": {"gpus_per_node": "4"}}}, "slurm", "pretrain")
    assert launch.parse_options(["partition=gpu", "additional_parameters.gres=gpu:2", "mem_gb=8"]) == {
        "partition": "gpu", "additional_parameters": {"gres": "gpu:2"}, "mem_gb": 8}


def test_a_multi_task_job_exports_the_torch_distributed_environment(monkeypatch):
    job_env = {"SUBMITIT_EXECUTOR": "local", "SUBMITIT_LOCAL_JOB_ID": "4242", "SUBMITIT_LOCAL_NTASKS": "2",
               "SUBMITIT_LOCAL_GLOBALID": "1", "SUBMITIT_LOCAL_LOCALID": "1", "SUBMITIT_LOCAL_NODEID": "0",
               "SUBMITIT_LOCAL_JOB_NUM_NODES": "1"}
    for key, value in job_env.items():
        monkeypatch.setenv(key, value)
    for key in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.setenv(key, "stale")  # so that the test restores them
    monkeypatch.delenv("MASTER_PORT")  # when set, submitit keeps it; else it derives one from the job id
    launch._export_distributed_env()
    assert (os.environ["RANK"], os.environ["WORLD_SIZE"], os.environ["LOCAL_RANK"]) == ("1", "2", "1")
    assert os.environ["MASTER_ADDR"] != "stale" and os.environ["MASTER_PORT"].isdigit()


@pytest.mark.parametrize("path", sorted(p for p in (Path(__file__).parents[1] / "config").rglob("*.yaml")
                                        if "overlays" not in p.parts), ids=lambda p: p.name)
def test_shipped_launcher_settings_are_valid_for_every_stage(path):
    section = launch.launcher_section(path)
    for launcher in launch.LAUNCHERS:
        for stage in ("pretrain", "linear", "knn", "detection"):
            launch.stage_settings(section, launcher, stage)
