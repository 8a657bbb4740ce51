"""`ftcl stage` and the job wrapper (ftcl/orchestrate/): a stage runs as a submitit job in its run folder
(local and debug executors), its logs are streamed, its errors reported, a preempted job is requeued and
resumed, and launcher settings are checked by the pipeline schema and turned into SLURM parameters
(without a cluster; tests/slurm/ runs them on one)."""

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

from ftcl import config, pipeline
from ftcl.config import ConfigError
from ftcl.orchestrate import folders, job, launcher

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
    """One real pretraining through `ftcl stage` and the local launcher (shared by the tests that need it)."""
    folder = tmp_path_factory.mktemp("stage")
    config_file = write_run_config(folder)
    proc = run_ftcl("stage", "pretrain", "--run-dir", "run", "--config", str(config_file), "--launcher", "local",
                    "-o", "cpus_per_task=1", cwd=folder)
    return folder, proc


def test_local_launcher_runs_a_stage_in_its_run_folder_and_streams_its_logs(pretrained):
    folder, proc = pretrained
    assert proc.returncode == 0, proc.stderr
    assert (folder / "run" / "pretrain" / "pretrain.json").is_file() and (folder / "run" / "pretrain.done").is_file()
    resolved = (folder / "run" / "configs" / "pretrain.yaml").read_text()
    assert resolved.startswith("# ftcl resolved run config: world 1, digest ")  # resolved once, here
    match = re.search(r"pretrain: job (\d+) submitted; logs: (\S+) and (\S+)", proc.stderr)
    assert match, proc.stderr
    stdout_log, stderr_log = Path(match[2]), Path(match[3])
    assert stdout_log.parent == folder / "run" / "jobs" / "pretrain" and stdout_log.is_file() and stderr_log.is_file()
    assert "[pretrain] done" in stdout_log.read_text()
    assert "[pretrain] done" in proc.stdout  # streamed while the job ran
    assert f"job {match[1]} finished" in proc.stderr


def test_local_job_is_tracked_with_its_launcher(pretrained):
    from mlflow.tracking import MlflowClient

    folder, _ = pretrained
    client = MlflowClient(f"sqlite:///{folder / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("ftcl").experiment_id])
    assert [r.data.tags["ftcl.launcher"] for r in runs] == ["local"]


def test_a_finished_stage_under_the_same_settings_runs_nothing(pretrained):
    folder, _ = pretrained
    proc = run_ftcl("stage", "pretrain", "--run-dir", "run", "--config", "run/configs/pretrain.yaml", cwd=folder)
    assert proc.returncode == 0, proc.stderr
    assert "already holds this stage's result for these settings; nothing to run" in proc.stderr
    assert "submitted" not in proc.stderr


def test_debug_launcher_runs_the_stage_in_process_and_logs_to_a_file(pretrained):
    folder, _ = pretrained
    knn = folder / "knn.yaml"
    knn.write_text(yaml.safe_dump({**yaml.safe_load((folder / "run.yaml").read_text()),
                                   "tracking": {"enabled": False}}))
    proc = run_ftcl("stage", "knn", "--run-dir", "run", "--config", str(knn), "--launcher", "debug",
                    "--log", "knn.log", cwd=folder)
    assert proc.returncode == 0, proc.stderr
    assert (folder / "run" / "knn" / "knn.json").is_file()
    assert "[knn] top1" in proc.stdout  # in process: the stage prints straight to this console
    assert re.search(r"knn: job DEBUG_\d+ finished", (folder / "knn.log").read_text())


def test_a_failing_stage_fails_with_its_own_message_and_log_paths(tmp_path):
    config_file = write_run_config(tmp_path)
    cfg = yaml.safe_load(config_file.read_text())
    cfg["data"]["train_subset"] = 10  # fewer images than the batch: only the job can know
    config_file.write_text(yaml.safe_dump(cfg))
    proc = run_ftcl("stage", "pretrain", "--run-dir", "run", "--config", str(config_file), cwd=tmp_path)
    assert proc.returncode == 1
    assert "more than the 10 training images" in proc.stderr  # the stage's message, from the job
    assert "Traceback" not in proc.stderr.split("failed:")[1]
    logs = re.search(r"logs: (\S+) and (\S+)", proc.stderr.split("failed:")[1])
    assert logs and Path(logs[1]).is_file() and Path(logs[2]).is_file()
    assert not (tmp_path / "run" / "pretrain.done").exists()


def test_a_config_edited_after_it_was_resolved_is_refused(tmp_path):
    text = config.resolved.text(config.resolve(write_run_config(tmp_path)))
    with pytest.raises(ConfigError, match="changed after it was resolved"):
        job.run_stage("pretrain", tmp_path / "run", text.replace("epochs: 1", "epochs: 2"), "local", {}, tmp_path)
    with pytest.raises(ConfigError, match="checked for 1"):  # resolved for 1 process, launched on 2
        job.run_stage("pretrain", tmp_path / "run", text, "local", {"tasks_per_node": 2}, tmp_path)
    assert not (tmp_path / "run" / "pretrain").exists()


def test_an_exception_in_a_job_is_reported_with_its_traceback(tmp_path, capsys):
    submitted = launcher.submit(functools.partial(int, "not-a-number"), "local", tmp_path)
    assert launcher.follow(submitted, stage="check") == 1
    err = capsys.readouterr().err
    assert "check: job" in err and "failed" in err
    assert "Traceback" in err and "ValueError: invalid literal for int() with base 10: 'not-a-number'" in err


@pytest.mark.slow
def test_a_preempted_pretraining_is_requeued_and_resumes_from_its_checkpoint(tmp_path):
    config_file = write_run_config(tmp_path, epochs=8)
    stage = subprocess.Popen([FTCL, "stage", "pretrain", "--run-dir", "run", "--config", str(config_file),
                              "--job-dir", "jobs", "-o", "cpus_per_task=1"], cwd=tmp_path, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    last = tmp_path / "run" / "pretrain" / "checkpoints" / "last.pt"
    while not last.exists() and stage.poll() is None:  # no deadline: a hang is pytest's timeout (pyproject.toml)
        time.sleep(0.1)
    assert last.exists(), stage.communicate()
    controller = int(next((tmp_path / "jobs").glob("*_submitted.pkl")).name.split("_")[0])  # the local job's id
    task = int(subprocess.check_output(["pgrep", "-P", str(controller)], text=True).split()[0])
    os.kill(task, signal.SIGUSR2)  # what SLURM sends before preempting or timing out a job
    out, err = stage.communicate()
    assert stage.returncode == 0, err
    log = next((tmp_path / "jobs").glob("*_0_log.out")).read_text()
    assert "requeueing pretrain of" in log
    resumed = re.search(r"resumed from \S+ at epoch (\d+)/8", log)
    assert resumed and int(resumed[1]) >= 1, log
    assert "epoch 8/8" in log and (tmp_path / "run" / "pretrain.done").is_file()


def test_checkpoint_resubmits_the_same_stage():
    stage_job = job.StageJob("pretrain", "run", "slurm")
    delayed = stage_job.checkpoint()
    assert delayed.function is stage_job and (stage_job.stage, stage_job.run_dir) == ("pretrain", "run")


def test_slurm_settings_of_a_stage_become_sbatch_parameters(tmp_path, monkeypatch):
    # submitit's SLURM executor only looks for `srun` on PATH when built; nothing is submitted here
    # (tests/slurm submits to a real cluster), so a stand-in lets this run on a machine without SLURM
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 1\n")
    (bin_dir / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    section = pipeline.launcher_settings("slurm", {
        "partition": "gpu", "account": "lab", "gpus_per_node": 1, "cpus_per_task": 8, "mem_gb": 32,
        "timeout_min": 60, "additional_parameters": {"requeue": True}})
    section["stages"] = {"pretrain": {"gpus_per_node": 4, "timeout_min": 2880}}
    executor = launcher.make_executor("slurm", tmp_path, pipeline.stage_settings(section, "slurm", "pretrain"))
    params = executor._executor.parameters
    assert (params["partition"], params["account"], params["gpus_per_node"], params["ntasks_per_node"],
            params["time"], params["mem"], params["cpus_per_task"], params["additional_parameters"]) == (
        "gpu", "lab", 4, 4, 2880, "32GB", 8, {"requeue": True})  # one DDP process per GPU
    linear = pipeline.stage_settings(section, "slurm", "linear")
    assert (linear["gpus_per_node"], linear["timeout_min"]) == (1, 60)


def test_unknown_or_mistyped_launcher_settings_are_rejected_by_name():
    with pytest.raises(ConfigError, match=r"launcher.slurm.*'partiton'"):
        pipeline.launcher_settings("slurm", {"partiton": "gpu"})
    with pytest.raises(ConfigError, match=r"launcher.slurm.gpus_per_node.*'four'"):
        pipeline.launcher_settings("slurm", {"gpus_per_node": "four"})
    typed = pipeline.launcher_settings("slurm", {"gpus_per_node": "4", "mem_gb": "1.5", "partition": "None",
                                                 "additional_parameters": {"requeue": "True"}})["slurm"]
    assert (typed["gpus_per_node"], typed["mem_gb"], typed["partition"], typed["additional_parameters"]) == (
        4, 1.5, None, {"requeue": True})  # as Snakemake hands a profile's config: over, as text


def test_a_multi_task_job_exports_the_torch_distributed_environment(monkeypatch):
    job_env = {"SUBMITIT_EXECUTOR": "local", "SUBMITIT_LOCAL_JOB_ID": "4242", "SUBMITIT_LOCAL_NTASKS": "2",
               "SUBMITIT_LOCAL_GLOBALID": "1", "SUBMITIT_LOCAL_LOCALID": "1", "SUBMITIT_LOCAL_NODEID": "0",
               "SUBMITIT_LOCAL_JOB_NUM_NODES": "1"}
    for key, value in job_env.items():
        monkeypatch.setenv(key, value)
    for key in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.setenv(key, "stale")  # so that the test restores them
    monkeypatch.delenv("MASTER_PORT")  # when set, submitit keeps it; else it derives one from the job id
    job._export_distributed_env()
    assert (os.environ["RANK"], os.environ["WORLD_SIZE"], os.environ["LOCAL_RANK"]) == ("1", "2", "1")
    assert os.environ["MASTER_ADDR"] != "stale" and os.environ["MASTER_PORT"].isdigit()


def test_the_cli_knows_the_launchers_the_schema_does():
    from ftcl import cli
    from ftcl.constants import LAUNCHERS

    stage_parser = cli.build_parser()._subparsers._group_actions[0].choices["stage"]
    launcher_choices = next(a.choices for a in stage_parser._actions if a.dest == "launcher")
    assert set(launcher_choices) == set(LAUNCHERS)
    assert set(LAUNCHERS) == set(pipeline.schema()["properties"]["launcher"]["properties"]["name"]["enum"])
    assert folders.marker_path("r", "knn") == Path("r") / "knn.done"
