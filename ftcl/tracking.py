"""MLflow at the edge: experiments, parent/child runs, params, metrics and artifacts.

The default store is ``sqlite:///<results>/mlflow.db`` with artifacts under
``<results>/mlartifacts/<experiment>``: never ``./mlruns`` by accident. A stage run writes its run
id to ``<out>/.mlflow_run_id``; a requeued or restarted stage finds it there and continues the same
run instead of creating a second one.

Row x seed parent runs (``<row> · seed <k>``) are what rows are compared on in the MLflow UI: each
holds the row's overrides as params (``tracking.tags.overrides``, JSON) and, as metrics, the latest
headline result of its stages (:data:`HEADLINE_METRICS`), which a stage's ``log_metrics`` also logs
to the parent (at step 0, so the value logged last is the one shown). A superseded stage run
(``ftcl.superseded``) feeds its parent nothing.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ftcl.config.types import RunConfig, to_dict
from ftcl.constants import (
    PARENT_STAGE,
    RESULTS_DIR,
    RUN_ID_FILE,
    TAG_ROW,
    TAG_SEED,
    TAG_STAGE,
    TAG_SUPERSEDED,
)
from ftcl.errors import TrackingError
from ftcl.files import write_text

__all__ = ["HEADLINE_METRICS", "TrackingError", "Tracker"]

#: the metrics a stage run also logs to its row x seed parent run (latest value wins there)
HEADLINE_METRICS: tuple[str, ...] = (
    "linear/top1", "knn/top1",
    "det/voc07_AP50", "det/voc07_AP", "det/voc07_AP75", "det/coco_AP", "det/coco_AP50", "det/coco_AP75",
    "scores/pos_mean", "scores/neg_mean",
)
#: the step headline metrics are logged at on a parent run: one step, so MLflow's latest value (the
#: largest step, then the newest timestamp) is the one logged last, whatever the stage's own steps
PARENT_STEP = 0
#: MLflow 3's experiment-kind tag; ftcl's experiments are model training, not GenAI development
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
PARENT_RUN_TAG = "mlflow.parentRunId"
NOTE_TAG = "mlflow.note.content"


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
    """Experiment id for ``name``; created (with ``artifact_location``) when missing. The experiment
    is tagged ``mlflow.experimentKind: custom_model_development`` (model training, not GenAI), an
    existing one too when it has no kind yet (a kind someone chose is kept)."""
    exp = _retry(client.get_experiment_by_name, name)
    if exp is None:
        try:
            return _retry(client.create_experiment, name, artifact_location=artifact_location,
                          tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
        except Exception:  # another process created it first
            exp = _retry(client.get_experiment_by_name, name)
            if exp is None:
                raise
    if EXPERIMENT_KIND_TAG not in (exp.tags or {}):
        _retry(client.set_experiment_tag, exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
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


def parent_params(cfg: Mapping, seed: int | str, overrides: Mapping[str, Any] | None) -> dict[str, str] | None:
    """The params of a row x seed parent run: ``seed`` and each of the row's ``overrides`` (dotted
    run-config keys), valued as the run config has them (as :meth:`Tracker.log_params` writes
    values); None without ``overrides`` (then a parent's params are left as they are)."""
    if overrides is None:
        return None
    from ftcl.config import flatten

    flat = flatten(cfg)
    wanted = flatten(overrides)  # a nested override ({"ft": {"positive": ...}}) counts key by key
    return {"seed": str(seed), **{k: str(flat.get(k, v))[:6000] for k, v in wanted.items()}}


def parse_overrides(text: Any) -> dict[str, Any]:
    """``tracking.tags.overrides``: a JSON object of the row's dotted overrides."""
    try:
        value = json.loads(text) if isinstance(text, str) else text
    except ValueError as err:
        raise TrackingError(f"key 'tracking.tags.overrides' is not JSON ({err}): {str(text)[:200]!r}") from None
    if not isinstance(value, Mapping):
        raise TrackingError(f"key 'tracking.tags.overrides' must be a JSON object of dotted keys, not {text!r}")
    return dict(value)


def _parents(client, experiment_id: str, row: str, seed: int | str) -> list:
    """The row x seed parent runs that are not superseded, oldest first (ties: by run id)."""
    query = (f"tags.`{TAG_ROW}` = '{row}' and tags.`{TAG_SEED}` = '{seed}' and "
             f"tags.`{TAG_STAGE}` = '{PARENT_STAGE}'")
    found = _retry(client.search_runs, [experiment_id], filter_string=query, max_results=1000)
    runs = [r for r in found if TAG_SUPERSEDED not in r.data.tags]
    return sorted(runs, key=lambda r: (r.info.start_time or 0, r.info.run_id))


def _stale_params(run, params: Mapping[str, str]) -> list[str]:
    """``key (old -> new)`` for each param of ``run`` that ``params`` changes or no longer has."""
    logged = run.data.params
    return [f"{k} ({v!r} -> {params.get(k, '<unset>')!r})" for k, v in sorted(logged.items()) if params.get(k) != v]


def _log_params(client, run_id: str, params: Mapping[str, str], logged: Mapping[str, str]) -> bool:
    """Log the ``params`` ``run_id`` does not have yet; True when there were any."""
    from mlflow.entities import Param

    fresh = [Param(k, v) for k, v in params.items() if k not in logged]
    for i in range(0, len(fresh), 100):
        _retry(client.log_batch, run_id, params=fresh[i : i + 100])
    return bool(fresh)


def _headline(metrics: Mapping[str, float]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if k in HEADLINE_METRICS and v == v}


def log_parent_metrics(client, parent_id: str, metrics: Mapping[str, float]) -> None:
    """Log ``metrics`` to a parent run at :data:`PARENT_STEP`, time now: they become its latest values."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    batch = [Metric(k, float(v), now, PARENT_STEP) for k, v in metrics.items()]
    if batch:
        _retry(client.log_batch, parent_id, metrics=batch)


def ensure_parent_run(client, experiment_id: str, row: str, seed: int | str, tags: Mapping[str, Any] = (),
                      params: Mapping[str, str] | None = None, stage: str | None = None) -> str:
    """The id of the parent run of ``row`` x ``seed``, created (with ``tags`` and ``params``) when
    there is none. An existing parent gets the ``params`` it lacks. One whose params ``params``
    would change (MLflow cannot change a param) is superseded: tagged ``ftcl.superseded``, renamed
    ``... (superseded)``, and replaced by a new parent that takes along its stage runs that are not
    superseded (but ``stage``'s, which is starting a new run) and their headline metrics.

    Stages starting at once may each create one: the oldest is kept, the others deleted."""
    tags = {k: str(v) for k, v in dict(tags).items()}
    found = _parents(client, experiment_id, row, seed)
    if found:
        parent = found[0]
        stale = [] if params is None else _stale_params(parent, params)
        if not stale:
            if params is not None and _log_params(client, parent.info.run_id, params, parent.data.params) \
                    and NOTE_TAG in tags:  # new overrides: the description lists them too
                _retry(client.set_tag, parent.info.run_id, NOTE_TAG, tags[NOTE_TAG])
            return parent.info.run_id
        _supersede_parent(client, parent, f"row settings changed: {', '.join(stale)}")
    run = _retry(client.create_run, experiment_id, run_name=parent_run_name(row, seed),
                 tags={TAG_ROW: str(row), TAG_SEED: str(seed), TAG_STAGE: PARENT_STAGE, **tags})
    mine = run.info.run_id
    if params:
        _log_params(client, mine, params, {})
    now = _parents(client, experiment_id, row, seed)  # another stage may have created one too
    kept = now[0].info.run_id if now else mine
    if kept != mine:
        _retry(client.delete_run, mine)
        if params is not None:
            _log_params(client, kept, params, now[0].data.params)
    if found:  # the superseded parent's stage runs move to the one kept
        _adopt_children(client, experiment_id, found[0].info.run_id, kept, stage)
    return kept


def _supersede_parent(client, parent, reason: str) -> None:
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    _retry(client.set_tag, parent.info.run_id, TAG_SUPERSEDED, stamp)
    _retry(client.set_tag, parent.info.run_id, "ftcl.superseded_reason", reason[:5000])
    _retry(client.update_run, parent.info.run_id, name=f"{parent.info.run_name} (superseded)")


def _adopt_children(client, experiment_id: str, old: str, new: str, stage: str | None) -> None:
    """Move the stage runs of parent ``old`` that are not superseded (but ``stage``'s) to parent
    ``new``, with their headline metrics; end ``old``."""
    children = _retry(client.search_runs, [experiment_id], filter_string=f"tags.`{PARENT_RUN_TAG}` = '{old}'",
                      max_results=1000)
    headline: dict[str, float] = {}
    for child in sorted(children, key=lambda r: (r.info.start_time or 0, r.info.run_id)):  # newest run wins
        ctags = child.data.tags
        if TAG_SUPERSEDED in ctags or (stage is not None and ctags.get(TAG_STAGE) == stage):
            continue
        _retry(client.set_tag, child.info.run_id, PARENT_RUN_TAG, new)
        headline.update(_headline(child.data.metrics))
    log_parent_metrics(client, new, headline)
    left = _retry(client.search_runs, [experiment_id], filter_string=f"tags.`{PARENT_RUN_TAG}` = '{old}'",
                  max_results=1000)
    states = {r.info.status for r in left}
    if "RUNNING" not in states and "SCHEDULED" not in states:
        _retry(client.set_terminated, old, status=next((s for s in ("FAILED", "KILLED") if s in states), "FINISHED"))


def supersede_run(client, run_id: str, stamp: str, moved_to: str | Path | None = None) -> None:
    """Tag a stage run whose folder was moved aside ``ftcl.superseded`` (it stays in the store) and
    take back what it fed its parent run: each headline metric the parent still shows with this
    run's value is logged there as NaN (no current result) until the stage's new run logs one."""
    _retry(client.set_tag, run_id, TAG_SUPERSEDED, stamp)
    if moved_to is not None:
        _retry(client.set_tag, run_id, "ftcl.superseded_to", str(moved_to))
    run = _retry(client.get_run, run_id)
    parent_id = run.data.tags.get(PARENT_RUN_TAG)
    if not parent_id:
        return
    parent = _retry(client.get_run, parent_id)
    if parent.data.tags.get(TAG_STAGE) != PARENT_STAGE:
        return
    shown = parent.data.metrics
    fed = [k for k, v in _headline(run.data.metrics).items() if k in shown and shown[k] == v]
    log_parent_metrics(client, parent_id, dict.fromkeys(fed, math.nan))


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
    children = _retry(client.search_runs, [experiment_id], filter_string=f"tags.`{PARENT_RUN_TAG}` = '{parent_id}'",
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

    def __init__(self, cfg: RunConfig, out_dir: str | Path, stage: str, rank: int = 0):
        tcfg = cfg.tracking
        self.enabled = tcfg.enabled and rank == 0
        self.cfg, self.out_dir, self.stage = cfg, Path(out_dir), stage
        self.run_id: str | None = None
        self.parent_run_id: str | None = None
        self.client = None
        if not self.enabled:
            return
        uri = tracking_uri(tcfg.uri, _results_dir(self.out_dir))
        check_reachable(uri)
        self.client = _client(uri)
        exp_id = get_or_create_experiment(self.client, cfg.experiment,
                                          artifact_root(tcfg.artifact_root, uri, cfg.experiment))
        self.experiment_id = exp_id
        self.run_id = self._start(exp_id)

    def _start(self, exp_id: str) -> str:
        tcfg, tags = self.cfg.tracking, dict(self.cfg.tracking.tags)
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
        overrides = tags.pop("overrides", None)  # the row's overrides: the parent run's params, not a tag
        overrides = None if overrides is None else parse_overrides(overrides)
        if id_file.is_file():  # a restarted stage continues its run
            run_id = id_file.read_text().strip()
            _retry(self.client.update_run, run_id, status="RUNNING")
            self._set_tags(run_id, system_tags)
            parent = _retry(self.client.get_run, run_id).data.tags.get(PARENT_RUN_TAG)
            if parent and _retry(self.client.get_run, parent).data.tags.get(TAG_STAGE) == PARENT_STAGE:
                self.parent_run_id = parent  # a row x seed parent run, kept by the stages (not one given)
                self._parent_running()
            return run_id
        parent = tcfg.parent_run_id
        if parent is None and TAG_ROW in system_tags and TAG_SEED in system_tags:
            row, seed = system_tags[TAG_ROW], system_tags[TAG_SEED]
            parent = ensure_parent_run(self.client, exp_id, row, seed, {
                "ftcl.git_commit": system_tags["ftcl.git_commit"], "ftcl.launcher": system_tags["ftcl.launcher"],
                NOTE_TAG: run_description(to_dict(self.cfg), row, seed, lead)},
                params=parent_params(to_dict(self.cfg), seed, overrides), stage=self.stage)
            self.parent_run_id = parent  # a row x seed parent run, kept by the stages (not one given)
            self._parent_running()
        if parent:
            system_tags[PARENT_RUN_TAG] = parent
        run = _retry(self.client.create_run, exp_id, run_name=tcfg.run_name or self.stage,
                     tags={**system_tags, **{k: str(v) for k, v in tags.items()}})
        write_text(id_file, run.info.run_id)
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
        headline = _headline(metrics)
        if headline and self.parent_run_id:
            self._log_to_parent(headline)

    def _log_to_parent(self, metrics: Mapping[str, float]) -> None:
        """Headline metrics also go to the row x seed parent run (the one the run is under now), so
        rows compare on parent runs; never from a superseded run."""
        try:
            tags = _retry(self.client.get_run, self.run_id).data.tags
            if TAG_SUPERSEDED in tags:
                return
            self.parent_run_id = tags.get(PARENT_RUN_TAG) or self.parent_run_id
            log_parent_metrics(self.client, self.parent_run_id, metrics)
        except Exception as err:  # bookkeeping only: never fail a stage for it
            print(f"[tracking] warning: parent run {self.parent_run_id} not updated ({err})", file=sys.stderr)

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
                try:  # the parent the run is under now (a replaced parent passes its stage runs on)
                    current = _retry(self.client.get_run, self.run_id).data.tags.get(PARENT_RUN_TAG)
                    self.parent_run_id = current or self.parent_run_id
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
