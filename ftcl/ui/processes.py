"""The ``mlflow server`` process behind ``ftcl ui``: its command line and environment, a free port, and
stopping it with every process it started (SIGTERM to its process group and to every descendant
seen, a grace period, then SIGKILL)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

STOP_GRACE_S = 10.0


def server_command(uri: str, host: str, port: int, artifact_root: str | None = None) -> list[str]:
    """The ``mlflow server`` command line (same Python as this process, one worker)."""
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri,
           "--host", host, "--port", str(port), "--workers", "1"]
    if artifact_root:
        cmd += ["--default-artifact-root", artifact_root]
    return cmd


def server_env(base: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ if base is None else base)
    env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"  # no job runner and its consumer processes
    env.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # a local results browser sends no usage data
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def port_in_use(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False




def descendants(pid: int) -> list:
    """Every live descendant of ``pid`` (psutil processes; empty without psutil)."""
    try:
        import psutil
    except ImportError:  # pragma: no cover - psutil comes with snakemake
        return []
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []


def _signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def stop_process_tree(proc: subprocess.Popen, grace: float = STOP_GRACE_S, known: Sequence = ()) -> None:
    """Stop ``proc`` (the leader of its own process group) and everything it started.

    SIGTERM to the group and to every descendant seen now or in ``known`` (psutil processes, which
    covers one that left the group), wait up to ``grace`` seconds for all of them, then SIGKILL
    the group and whatever is left, and reap them.
    """
    pgid = proc.pid  # start_new_session=True: the child leads its own group
    procs = {p.pid: p for p in [*known, *descendants(proc.pid)]}
    _signal_group(pgid, signal.SIGTERM)
    for p in procs.values():
        with contextlib.suppress(Exception):
            p.terminate()
    deadline = time.monotonic() + grace
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=grace)
    alive = list(procs.values())
    with contextlib.suppress(ImportError):
        import psutil

        _, alive = psutil.wait_procs(alive, timeout=max(0.1, deadline - time.monotonic()))
    _signal_group(pgid, signal.SIGKILL)  # stragglers still in the group (none after a clean stop)
    for p in alive:
        with contextlib.suppress(Exception):
            p.kill()
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=5)
    with contextlib.suppress(Exception):
        import psutil

        psutil.wait_procs(alive, timeout=5)


def log_tail(path: Path | None, lines: int = 30) -> str:
    if path is None or not path.is_file():
        return ""
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
