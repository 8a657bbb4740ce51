"""The `slurm_cluster` fixture: a real single-node SLURM cluster on localhost.

The cluster is brought up by `tests/slurm/cluster.sh start` (as root: it installs Slurm, MUNGE and
MariaDB with apt-get when missing) once per test session, and stopped at the end of the session
only if this fixture started it; a cluster that was already running is left running.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

CLUSTER_SH = Path(__file__).with_name("cluster.sh")
_UNFINISHED_STATES = {"PENDING", "RUNNING", "REQUEUED", "COMPLETING", "CONFIGURING", "SUSPENDED", "RESIZING"}
START_TIMEOUT_S = 300  # a first start on a fresh machine includes apt-get install
STOP_TIMEOUT_S = 120


@dataclass(frozen=True)
class SlurmCluster:
    """Handle on the running cluster, as seen by tests."""

    root: Path
    cpus: int  # CPUs the node advertises (oversubscribed: more than the machine has)
    gpus: int  # fake GPUs: jobs get CUDA_VISIBLE_DEVICES, torch sees no device
    partition: str = "debug"
    preempting_partition: str = "urgent"  # its jobs requeue `partition` jobs in their way

    def sacct(self, job_id: int | str, *, duplicates: bool = False) -> list[tuple[str, str]]:
        """`(JobID, State)` rows that `sacct` reports for a job, its steps included.

        With `duplicates=True` every attempt of a requeued job is listed (the earlier ones as
        REQUEUED); otherwise only the newest attempt, as submitit sees it.
        """
        cmd = ["sacct", "--noheader", "--parsable2", "--format=JobID,State", f"--jobs={job_id}"]
        if duplicates:
            cmd.append("--duplicates")
        out = subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=30).stdout
        return [(job, state) for job, state in (line.split("|", 1) for line in out.splitlines() if line)]

    def wait_for_end(self, job_id: int | str, timeout_s: float = 30) -> str:
        """Waits until sacct shows the job's newest attempt ended, and returns its state.

        submitit's `job.result()` returns as soon as the job wrote its result file, a moment
        before Slurm records the job as COMPLETED.
        """
        deadline = time.monotonic() + timeout_s
        while True:
            states = [state for job, state in self.sacct(job_id) if job == str(job_id)]
            # "CANCELLED by 0" -> "CANCELLED"
            if states and states[-1].split()[0] not in _UNFINISHED_STATES:
                return states[-1].split()[0]
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {states} in sacct after {timeout_s} s")
            time.sleep(0.25)


def _cluster_sh(command: str, timeout_s: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(CLUSTER_SH), command], capture_output=True, text=True, timeout=timeout_s)


def _node_resources() -> dict[str, int]:
    """CPUs and GPUs of the (single) node, from sinfo: e.g. "8 gpu:2" or "8 (null)"."""
    cmd = ["sinfo", "--noheader", "--format=%c %G"]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=30).stdout
    cpus, gres = out.splitlines()[0].split()
    return {"cpus": int(cpus), "gpus": int(gres.split(":")[-1]) if gres.startswith("gpu:") else 0}


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[SlurmCluster]:
    if not sys.platform.startswith("linux"):
        pytest.skip("the local SLURM cluster needs Linux")
    if os.geteuid() != 0:
        pytest.skip("the local SLURM cluster needs root (it installs and starts system daemons)")

    root = Path(os.environ.get("FTCL_SLURM_ROOT", "/tmp/ftcl-slurm"))
    was_running = _cluster_sh("status", timeout_s=30).returncode == 0
    started = _cluster_sh("start", timeout_s=START_TIMEOUT_S)
    if started.returncode != 0:
        pytest.fail(
            f"tests/slurm/cluster.sh start failed (rc={started.returncode}); logs in {root}/log\n"
            f"{started.stdout}\n{started.stderr}"
        )
    # Slurm's commands (sbatch, sacct, scontrol) find the cluster through SLURM_CONF, and
    # sbatch passes the submitter's environment on to the job, which calls scontrol itself.
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SLURM_CONF", str(root / "etc" / "slurm.conf"))
        yield SlurmCluster(root=root, **_node_resources())
    if not was_running:
        stopped = _cluster_sh("stop", timeout_s=STOP_TIMEOUT_S)
        assert stopped.returncode == 0, f"cluster.sh stop failed:\n{stopped.stdout}\n{stopped.stderr}"
