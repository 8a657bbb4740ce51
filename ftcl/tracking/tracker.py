"""One stage's MLflow run (:class:`Tracker`): created, or continued after a requeue or restart (its id
is in ``<out>/.mlflow_run_id``), nested under its row x seed parent run (itself under the row's row
run), closed with the stage."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ftcl.config.types import RunConfig, to_dict
from ftcl.constants import PARENT_STAGE, RESULTS_DIR, RUN_ID_FILE, TAG_ROW, TAG_SEED, TAG_STAGE, TAG_SUPERSEDED
from ftcl.files import write_text
from ftcl.tracking.parents import (
    NOTE_TAG,
    PARENT_RUN_TAG,
    close_parent_run,
    close_row_run,
    ensure_parent_run,
    headline_of,
    log_parent_metrics,
    parent_params,
    parse_overrides,
    row_run_description,
    row_run_of,
    run_description,
)
from ftcl.tracking.store import (
    artifact_root,
    check_reachable,
    get_or_create_experiment,
    git_commit,
    open_client,
    retry,
    tracking_uri,
)


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
        self.client = open_client(uri)
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
            retry(self.client.update_run, run_id, status="RUNNING")
            self._set_tags(run_id, system_tags)
            parent = retry(self.client.get_run, run_id).data.tags.get(PARENT_RUN_TAG)
            if parent and retry(self.client.get_run, parent).data.tags.get(TAG_STAGE) == PARENT_STAGE:
                self.parent_run_id = parent  # a row x seed parent run, kept by the stages (not one given)
                self._parent_running()
            return run_id
        parent = tcfg.parent_run_id
        if parent is None and TAG_ROW in system_tags and TAG_SEED in system_tags:
            row, seed = system_tags[TAG_ROW], system_tags[TAG_SEED]
            parent = ensure_parent_run(self.client, exp_id, row, seed, {
                "ftcl.git_commit": system_tags["ftcl.git_commit"], "ftcl.launcher": system_tags["ftcl.launcher"],
                NOTE_TAG: run_description(to_dict(self.cfg), row, seed, lead)},
                params=parent_params(to_dict(self.cfg), seed, overrides), stage=self.stage,
                row_tags={"ftcl.git_commit": system_tags["ftcl.git_commit"],
                          NOTE_TAG: row_run_description(row, self.cfg.experiment, lead)})
            self.parent_run_id = parent  # a row x seed parent run, kept by the stages (not one given)
            self._parent_running()
        if parent:
            system_tags[PARENT_RUN_TAG] = parent
        run = retry(self.client.create_run, exp_id, run_name=tcfg.run_name or self.stage,
                     tags={**system_tags, **{k: str(v) for k, v in tags.items()}})
        write_text(id_file, run.info.run_id)
        return run.info.run_id

    def _set_tags(self, run_id: str, tags: Mapping[str, str]) -> None:
        for k, v in tags.items():
            retry(self.client.set_tag, run_id, k, v)

    def log_params(self, params: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        from mlflow.entities import Param

        existing = retry(self.client.get_run, self.run_id).data.params
        fresh = [Param(k, str(v)[:6000]) for k, v in params.items() if k not in existing]
        for i in range(0, len(fresh), 100):
            retry(self.client.log_batch, self.run_id, params=fresh[i : i + 100])

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        if not self.enabled:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step or 0) for k, v in metrics.items() if v == v]
        if batch:
            retry(self.client.log_batch, self.run_id, metrics=batch)
        headline = headline_of(metrics)
        if headline and self.parent_run_id:
            self._log_to_parent(headline)

    def _log_to_parent(self, metrics: Mapping[str, float]) -> None:
        """Headline metrics also go to the row x seed parent run (the one the run is under now), so
        rows compare on parent runs; never from a superseded run."""
        try:
            tags = retry(self.client.get_run, self.run_id).data.tags
            if TAG_SUPERSEDED in tags:
                return
            self.parent_run_id = tags.get(PARENT_RUN_TAG) or self.parent_run_id
            log_parent_metrics(self.client, self.parent_run_id, metrics)
        except Exception as err:  # bookkeeping only: never fail a stage for it
            print(f"[tracking] warning: parent run {self.parent_run_id} not updated ({err})", file=sys.stderr)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        if self.enabled and Path(path).exists():
            fn = self.client.log_artifacts if Path(path).is_dir() else self.client.log_artifact
            retry(fn, self.run_id, str(path), artifact_path)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        if self.enabled:
            self._set_tags(self.run_id, {k: str(v) for k, v in tags.items()})

    def _parent_running(self) -> None:
        """The parent run, and the row run above it, show RUNNING while one of its stages runs."""
        if self.parent_run_id:
            try:
                retry(self.client.update_run, self.parent_run_id, status="RUNNING")
                row_id = row_run_of(self.client, self.parent_run_id)
                if row_id:
                    retry(self.client.update_run, row_id, status="RUNNING")
            except Exception as err:  # bookkeeping only: never fail a stage for it
                print(f"[tracking] warning: parent run {self.parent_run_id} not updated ({err})", file=sys.stderr)

    def finish(self, status: str = "FINISHED") -> None:
        if self.enabled and self.run_id:
            retry(self.client.set_terminated, self.run_id, status=status)
            if self.parent_run_id:
                try:  # the parent the run is under now (a replaced parent passes its stage runs on)
                    current = retry(self.client.get_run, self.run_id).data.tags.get(PARENT_RUN_TAG)
                    self.parent_run_id = current or self.parent_run_id
                    close_parent_run(self.client, self.experiment_id, self.parent_run_id)
                    row_id = row_run_of(self.client, self.parent_run_id)
                    if row_id:
                        close_row_run(self.client, self.experiment_id, row_id)
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
