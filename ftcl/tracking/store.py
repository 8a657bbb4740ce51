"""The MLflow store: where it is, opening it safely (many jobs at once), retries, experiments.

The default store is ``sqlite:///<results>/mlflow.db`` with artifacts under
``<results>/mlartifacts/<experiment>``: never ``./mlruns`` by accident. ``$MLFLOW_TRACKING_URI``
names another one where a run config or a command does not (``ftcl ui`` uses the same rule).
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ftcl.constants import RESULTS_DIR
from ftcl.errors import TrackingError

#: MLflow 3's experiment-kind tag; ftcl's experiments are model training, not GenAI development
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"


def check_reachable(uri: str, timeout_s: float = 5.0) -> None:
    """Fail fast (instead of MLflow's minutes of retries) when a tracking server does not answer."""
    if not uri.startswith(("http://", "https://")):
        return
    import http.client
    from urllib.parse import urlsplit

    parts = urlsplit(uri)
    conn_type = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    conn = conn_type(parts.hostname, parts.port, timeout=timeout_s)
    try:
        conn.request("GET", parts.path.rstrip("/") + "/health")
        status = conn.getresponse().status
    except OSError as err:
        raise TrackingError(
            f"MLflow tracking server {uri} cannot be reached ({err}); start it, fix tracking.uri, "
            "or set tracking.enabled=false"
        ) from err
    finally:
        conn.close()
    if status != 200:
        raise TrackingError(f"MLflow tracking server {uri} answered /health with HTTP {status}")


def tracking_uri(uri: str | None, results_dir: str | Path = RESULTS_DIR, create: bool = True,
                 environment: bool = True) -> str:
    """``uri`` as given, else ``$MLFLOW_TRACKING_URI`` (unless ``environment`` is false), else the
    project's sqlite store under ``results_dir`` (an absolute path; the folder is created unless
    ``create`` is false)."""
    uri = uri or (os.environ.get("MLFLOW_TRACKING_URI") if environment else None)
    if uri:
        return uri
    results = Path(results_dir).resolve()
    if create:
        results.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{results / 'mlflow.db'}"


def artifact_root(root: str | None, uri: str, experiment: str) -> str | None:
    """Artifact location for a new experiment: explicit, beside a sqlite store, or the server's."""
    if root:
        return str(Path(root).resolve() / experiment) if "://" not in root else f"{root.rstrip('/')}/{experiment}"
    if uri.startswith("sqlite:///"):
        return str(Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts" / experiment)
    return None


def open_client(uri: str):
    """An MlflowClient; a sqlite store is opened (and created on first use) under a file lock,
    since several jobs creating the same new database at once race on its tables."""
    import fcntl

    from mlflow.tracking import MlflowClient

    # no mlflow.set_tracking_uri: it exports $MLFLOW_TRACKING_URI, which every later store lookup in
    # this process and every child process (a pipeline started from here) would then follow
    if not uri.startswith("sqlite:///"):
        return MlflowClient(uri)
    db = Path(uri.removeprefix("sqlite:///"))
    db.parent.mkdir(parents=True, exist_ok=True)
    with open(db.with_name(db.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            client = MlflowClient(uri)
            client.search_experiments(max_results=1)  # forces the store (tables, migrations) into being
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return client


def retry(fn, *args, attempts: int = 8, **kwargs):
    """Retry a store call that failed on a busy sqlite database or a flaky server."""
    delay = 0.2
    for i in range(attempts):
        try:
            return fn(*args, **kwargs)
        except Exception as err:  # mlflow wraps sqlite 'database is locked' in several types
            transient = any(s in str(err).lower() for s in ("locked", "busy", "timed out", "connection", "503"))
            if not transient or i == attempts - 1:
                raise
            time.sleep(delay)
            delay = min(delay * 2, 3.0)
    return None


def get_or_create_experiment(client, name: str, artifact_location: str | None) -> str:
    """Experiment id for ``name``; created (with ``artifact_location``) when missing. The experiment
    is tagged ``mlflow.experimentKind: custom_model_development`` (model training, not GenAI), an
    existing one too when it has no kind yet (a kind someone chose is kept)."""
    exp = retry(client.get_experiment_by_name, name)
    if exp is None:
        try:
            return retry(client.create_experiment, name, artifact_location=artifact_location,
                          tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
        except Exception:  # another process created it first
            exp = retry(client.get_experiment_by_name, name)
            if exp is None:
                raise
    if EXPERIMENT_KIND_TAG not in (exp.tags or {}):
        retry(client.set_experiment_tag, exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    return exp.experiment_id


def create_experiment(store: Mapping[str, Any], experiment: str, marker: str | Path) -> None:
    """Create the MLflow store and ``experiment`` before any stage job starts (stage jobs that start
    together would otherwise race to create a new sqlite store); write what was created to ``marker``.
    ``store``: ``{"enabled", "uri", "artifact_root"}`` of the run configs' tracking section."""
    marker = Path(marker)
    if not store["enabled"]:
        marker.write_text("tracking disabled\n")
        return
    uri = tracking_uri(store["uri"])
    client = open_client(uri)
    experiment_id = get_or_create_experiment(client, experiment, artifact_root(store["artifact_root"], uri, experiment))
    marker.write_text(f"{uri}\nexperiment {experiment} (id {experiment_id})\n")


def git_commit() -> str:
    """The project's git commit (``unknown`` outside a checkout)."""
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             timeout=5, cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` store (None for other stores)."""
    return Path(uri.removeprefix("sqlite:///")) if uri.startswith("sqlite:///") else None


def default_artifact_root(uri: str) -> str | None:
    """Where new experiments keep artifacts: ``mlartifacts`` beside a sqlite store (the root
    :func:`artifact_root` uses), else the server's default."""
    db = sqlite_path(uri)
    return str(db.parent / "mlartifacts") if db is not None else None
