"""Smoke tests of the local SLURM cluster through submitit: results, fake GPUs, sacct, requeue."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import cloudpickle
import pytest
import submitit

pytestmark = pytest.mark.slurm

# Pytest imports this file under a name the job's Python cannot import; pickling its functions
# and classes by value lets the job run them without any PYTHONPATH set-up.
cloudpickle.register_pickle_by_value(sys.modules[__name__])


def add(a: int, b: int) -> int:
    return a + b


def visible_gpus() -> str | None:
    return os.environ.get("CUDA_VISIBLE_DEVICES")


class ResumableCounter(submitit.helpers.Checkpointable):
    """Counts to `steps`, saving progress to a file after each step and resuming from it.

    Each attempt reports where it started, as read from the file and as held in memory (the
    latter only survives a requeue when submitit's checkpoint() pickled it).
    """

    def __init__(self, progress_file: Path, steps: int, step_s: float) -> None:
        self.progress_file = progress_file
        self.steps = steps
        self.step_s = step_s
        self.done_in_memory = 0

    def __call__(self) -> dict[str, int]:
        text = self.progress_file.read_text() if self.progress_file.exists() else ""
        resumed_from_file = int(text or 0)
        resumed_from_memory = self.done_in_memory
        for step in range(max(resumed_from_file, resumed_from_memory), self.steps):
            time.sleep(self.step_s)
            self.done_in_memory = step + 1
            self.progress_file.write_text(str(step + 1))
        return {
            "restart_count": int(os.environ.get("SLURM_RESTART_COUNT", "0")),
            "resumed_from_file": resumed_from_file,
            "resumed_from_memory": resumed_from_memory,
        }


def _executor(folder: Path, partition: str, **overrides: object) -> submitit.AutoExecutor:
    # timeout_min=5, not less: Slurm sends submitit's USR2 (90 s before the limit) up to 30 s
    # early, so a 2-minute job is signalled as soon as it starts (see cluster.sh).
    params = {"slurm_partition": partition, "timeout_min": 5, "cpus_per_task": 1} | overrides
    executor = submitit.AutoExecutor(folder=folder, cluster="slurm")
    executor.update_parameters(**params)
    return executor


def _wait_for_progress(progress_file: Path, at_least: int, timeout_s: float = 60) -> int:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if progress_file.exists() and int(progress_file.read_text() or 0) >= at_least:
            return int(progress_file.read_text())
        time.sleep(0.2)
    raise AssertionError(f"the job did not reach step {at_least} within {timeout_s} s")


def test_submitit_jobs_complete_with_and_without_a_fake_gpu(slurm_cluster, tmp_path):
    cpu_job = _executor(tmp_path, slurm_cluster.partition).submit(add, 2, 3)
    gpu_job = _executor(tmp_path, slurm_cluster.partition, gpus_per_node=1).submit(visible_gpus)

    assert cpu_job.result() == 5
    assert gpu_job.result() == "0"
    for job in (cpu_job, gpu_job):
        assert slurm_cluster.wait_for_end(job.job_id) == "COMPLETED"


def test_externally_requeued_job_resumes_from_saved_progress(slurm_cluster, tmp_path):
    progress_file = tmp_path / "progress.txt"
    job = _executor(tmp_path, slurm_cluster.partition).submit(ResumableCounter(progress_file, 16, 0.5))
    saved_before_requeue = _wait_for_progress(progress_file, at_least=2)

    subprocess.run(["scontrol", "requeue", job.job_id], check=True, timeout=30)
    result = job.result()  # the job id is unchanged, so submitit follows the second attempt

    assert result["restart_count"] == 1
    assert saved_before_requeue <= result["resumed_from_file"] < 16
    assert result["resumed_from_memory"] == 0  # an external requeue calls no checkpoint()
    assert slurm_cluster.wait_for_end(job.job_id) == "COMPLETED"
    rows = slurm_cluster.sacct(job.job_id, duplicates=True)
    assert [state for job_id, state in rows if job_id == job.job_id] == ["REQUEUED", "COMPLETED"]


def test_preempted_job_checkpoints_requeues_itself_and_resumes_from_memory(slurm_cluster, tmp_path):
    progress_file = tmp_path / "progress.txt"
    job = _executor(tmp_path, slurm_cluster.partition).submit(ResumableCounter(progress_file, 16, 0.5))
    _wait_for_progress(progress_file, at_least=2)

    # A job that needs every CPU of the node preempts the running one, which gets USR2 first.
    urgent = _executor(tmp_path, slurm_cluster.preempting_partition, cpus_per_task=slurm_cluster.cpus)
    assert urgent.submit(add, 1, 1).result() == 2
    result = job.result()

    assert result["restart_count"] == 1
    assert result["resumed_from_memory"] >= 2  # checkpoint() pickled the callable's state
    assert slurm_cluster.wait_for_end(job.job_id) == "COMPLETED"
