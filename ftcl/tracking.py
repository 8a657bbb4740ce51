"""MLflow at the edge: experiments, parent/child runs, params, metrics and artifacts.

The default store is ``sqlite:///<results>/mlflow.db`` with artifacts under
``<results>/mlartifacts/<experiment>``: never ``./mlruns`` by accident. A stage run writes its run
id to ``<out>/.mlflow_run_id``; a requeued or restarted stage finds it there and continues the same
run instead of creating a second one.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ftcl.constants import PARENT_STAGE, RESULTS_DIR, RUN_ID_FILE, TAG_ROW, TAG_SEED, TAG_STAGE
from ftcl.errors import TrackingError

__all__ = ["TrackingError", "Tracker"]


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


def tracking_uri(uri: str | None, results_dir: str | Path = RESULTS_DIR) -> str:
    """``uri`` as given, or the project's sqlite store under ``results_dir`` (absolute path)."""
    if uri:
        return uri
    results = Path(results_dir).resolve()
    results.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{results / 'mlflow.db'}"


def artifact_root(root: str | None, uri: str, experiment: str) -> str | None:
    """Artifact location for a new experiment: explicit, beside a sqlite store, or the server's."""
    if root:
        return str(Path(root).resolve() / experiment) if "://" not in root else f"{root.rstrip('/')}/{experiment}"
    if uri.startswith("sqlite:///"):
        return str(Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts" / experiment)
    return None


def _client(uri: str):
    """An MlflowClient; a sqlite store is opened (and created on first use) under a file lock,
    since several jobs creating the same new database at once race on its tables."""
    import fcntl

    import mlflow
    from mlflow.tracking import MlflowClient

    mlflow.set_tracking_uri(uri)
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


def _retry(fn, *args, attempts: int = 8, **kwargs):
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
    """Experiment id for ``name``; created (with ``artifact_location``) when missing."""
    exp = _retry(client.get_experiment_by_name, name)
    if exp is not None:
        return exp.experiment_id
    try:
        return _retry(client.create_experiment, name, artifact_location=artifact_location)
    except Exception:  # another process created it first
        exp = _retry(client.get_experiment_by_name, name)
        if exp is None:
            raise
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
    client = _client(uri)
    experiment_id = get_or_create_experiment(client, experiment, artifact_root(store["artifact_root"], uri, experiment))
    marker.write_text(f"{uri}\nexperiment {experiment} (id {experiment_id})\n")


def parent_run_name(row: str, seed: int | str) -> str:
    return f"{row} · seed {seed}"


def ensure_parent_run(client, experiment_id: str, row: str, seed: int | str, tags: Mapping[str, Any] = ()) -> str:
    """The id of the parent run of ``row`` x ``seed``, created when it does not exist yet."""
    query = (f"tags.`{TAG_ROW}` = '{row}' and tags.`{TAG_SEED}` = '{seed}' and "
             f"tags.`{TAG_STAGE}` = '{PARENT_STAGE}'")
    found = _retry(client.search_runs, [experiment_id], filter_string=query, max_results=1,
                   order_by=["attributes.start_time ASC"])
    if found:
        return found[0].info.run_id
    run = _retry(client.create_run, experiment_id, run_name=parent_run_name(row, seed),
                 tags={TAG_ROW: str(row), TAG_SEED: str(seed), TAG_STAGE: PARENT_STAGE,
                       **{k: str(v) for k, v in dict(tags).items()}})
    return run.info.run_id


#: run-config keys a parent run's description leaves out (shown in its heading, or the store's own)
_DESCRIPTION_SKIP = ("experiment", "seed")


def run_description(cfg: Mapping, row: str, seed: int | str, lead: str | None = None) -> str:
    """The MLflow description (``mlflow.note.content``, Markdown) of a row x seed parent run: an
    optional ``lead`` text (``tracking.tags.description``), then every run-config key whose value
    differs from ftcl's defaults (the row's overrides and the pipeline's shared settings)."""
    from ftcl.config import defaults, flatten

    base = flatten(defaults())
    missing = object()
    changed = {k: v for k, v in flatten(cfg).items()
               if k not in _DESCRIPTION_SKIP and not k.startswith("tracking.") and base.get(k, missing) != v}
    lines = [f"**{row}** · seed {seed} · experiment `{cfg.get('experiment')}`", ""]
    if lead:
        lines += [str(lead), ""]
    if changed:
        lines.append("Settings that differ from ftcl's defaults:")
        lines += [f"- `{k}`: `{v}`" for k, v in changed.items()]
    else:
        lines.append("ftcl's default settings.")
    return "\n".join(lines)[:5000]


def close_parent_run(client, experiment_id: str, parent_id: str) -> None:
    """End a parent run once none of its child runs is RUNNING: FAILED when a child failed, else
    KILLED when one was interrupted, else FINISHED (so the UI shows each row x seed's state).
    Each stage calls it after ending its own run, so the stage that ends last closes the parent."""
    children = _retry(client.search_runs, [experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}'",
                      max_results=1000)
    states = {run.info.status for run in children}
    if not children or "RUNNING" in states or "SCHEDULED" in states:
        return
    status = next((s for s in ("FAILED", "KILLED") if s in states), "FINISHED")
    _retry(client.set_terminated, parent_id, status=status)


def git_commit() -> str:
    """The project's git commit (``unknown`` outside a checkout)."""
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             timeout=5, cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


class Tracker:
    """One stage's MLflow run. Disabled (every call a no-op) when ``tracking.enabled`` is false."""

    def __init__(self, cfg: Mapping, out_dir: str | Path, stage: str, rank: int = 0):
        tcfg = cfg["tracking"]
        self.enabled = bool(tcfg["enabled"]) and rank == 0
        self.cfg, self.out_dir, self.stage = cfg, Path(out_dir), stage
        self.run_id: str | None = None
        self.parent_run_id: str | None = None
        self.client = None
        if not self.enabled:
            return
        uri = tracking_uri(tcfg["uri"], _results_dir(self.out_dir))
        check_reachable(uri)
        self.client = _client(uri)
        exp_id = get_or_create_experiment(self.client, cfg["experiment"],
                                          artifact_root(tcfg["artifact_root"], uri, cfg["experiment"]))
        self.experiment_id = exp_id
        self.run_id = self._start(exp_id)

    def _start(self, exp_id: str) -> str:
        tcfg, tags = self.cfg["tracking"], dict(self.cfg["tracking"]["tags"])
        id_file = self.out_dir / RUN_ID_FILE
        system_tags = {
            TAG_STAGE: self.stage, "ftcl.git_commit": git_commit(),
            "ftcl.launcher": os.environ.get("FTCL_LAUNCHER", "direct"),
            "ftcl.out_dir": str(self.out_dir.resolve()),
        }
        if os.environ.get("SLURM_JOB_ID"):
            system_tags["slurm.job_id"] = os.environ["SLURM_JOB_ID"]
        for key, tag in (("row", TAG_ROW), ("seed", TAG_SEED)):
            if key in tags:
                system_tags[tag] = str(tags.pop(key))
        lead = tags.pop("description", None)  # text for the parent run's description, not a tag
        if id_file.is_file():  # a restarted stage continues its run
            run_id = id_file.read_text().strip()
            _retry(self.client.update_run, run_id, status="RUNNING")
            self._set_tags(run_id, system_tags)
            parent = _retry(self.client.get_run, run_id).data.tags.get("mlflow.parentRunId")
            if parent and _retry(self.client.get_run, parent).data.tags.get(TAG_STAGE) == PARENT_STAGE:
                self.parent_run_id = parent  # a row x seed parent run, kept by the stages (not one given)
                self._parent_running()
            return run_id
        parent = tcfg["parent_run_id"]
        if parent is None and TAG_ROW in system_tags and TAG_SEED in system_tags:
            row, seed = system_tags[TAG_ROW], system_tags[TAG_SEED]
            parent = ensure_parent_run(self.client, exp_id, row, seed, {
                "ftcl.git_commit": system_tags["ftcl.git_commit"], "ftcl.launcher": system_tags["ftcl.launcher"],
                "mlflow.note.content": run_description(self.cfg, row, seed, lead)})
            self.parent_run_id = parent  # a row x seed parent run, kept by the stages (not one given)
            self._parent_running()
        if parent:
            system_tags["mlflow.parentRunId"] = parent
        run = _retry(self.client.create_run, exp_id, run_name=tcfg["run_name"] or self.stage,
                     tags={**system_tags, **{k: str(v) for k, v in tags.items()}})
        self.out_dir.mkdir(parents=True, exist_ok=True)
        tmp = id_file.with_name(id_file.name + ".tmp")
        tmp.write_text(run.info.run_id)
        tmp.replace(id_file)
        return run.info.run_id

    def _set_tags(self, run_id: str, tags: Mapping[str, str]) -> None:
        for k, v in tags.items():
            _retry(self.client.set_tag, run_id, k, v)

    def log_params(self, params: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        from mlflow.entities import Param

        existing = _retry(self.client.get_run, self.run_id).data.params
        fresh = [Param(k, str(v)[:6000]) for k, v in params.items() if k not in existing]
        for i in range(0, len(fresh), 100):
            _retry(self.client.log_batch, self.run_id, params=fresh[i : i + 100])

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        if not self.enabled:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step or 0) for k, v in metrics.items() if v == v]
        if batch:
            _retry(self.client.log_batch, self.run_id, metrics=batch)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        if self.enabled and Path(path).exists():
            fn = self.client.log_artifacts if Path(path).is_dir() else self.client.log_artifact
            _retry(fn, self.run_id, str(path), artifact_path)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        if self.enabled:
            self._set_tags(self.run_id, {k: str(v) for k, v in tags.items()})

    def _parent_running(self) -> None:
        """The parent run shows RUNNING while one of its stages runs."""
        if self.parent_run_id:
            try:
                _retry(self.client.update_run, self.parent_run_id, status="RUNNING")
            except Exception as err:  # bookkeeping only: never fail a stage for it
                print(f"[tracking] warning: parent run {self.parent_run_id} not updated ({err})", file=sys.stderr)

    def finish(self, status: str = "FINISHED") -> None:
        if self.enabled and self.run_id:
            _retry(self.client.set_terminated, self.run_id, status=status)
            if self.parent_run_id:
                try:
                    close_parent_run(self.client, self.experiment_id, self.parent_run_id)
                except Exception as err:
                    print(f"[tracking] warning: parent run {self.parent_run_id} not updated ({err})",
                          file=sys.stderr)

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        # An interrupted job (preemption, Ctrl-C) stays RUNNING-resumable; a real error is FAILED.
        if exc_type is None:
            self.finish("FINISHED")
        elif issubclass(exc_type, KeyboardInterrupt | SystemExit):
            self.finish("KILLED")
        else:
            self.finish("FAILED")


def _results_dir(out_dir: Path) -> Path:
    """The ``results`` folder above ``out_dir`` when there is one, else ``./results``."""
    for parent in [out_dir.resolve(), *out_dir.resolve().parents]:
        if parent.name == RESULTS_DIR:
            return parent
    return Path(RESULTS_DIR)
