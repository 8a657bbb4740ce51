"""Run folders of the pipeline: a stage starts only in a folder that holds its own earlier work, and
finished work is never deleted: a stage whose settings changed moves its previous folder aside.

Layout of one row and seed, ``<results>/<experiment>/<row>/seed<k>/`` (docs/ARCHITECTURE.md):
``configs/<stage>.yaml`` (the run config the stage was last started with), ``<stage>/`` (the
stage's run folder, with ``.ftcl_stage.json``: what it was computed from), ``<stage>.done`` (the
marker Snakemake waits for), and ``.superseded/<stage>-<UTC time>/`` (earlier folders, intact).

A stage's *key* is the digest of the run-config keys it reads (:func:`ftcl.pipeline.stage_digest`)
plus, for the stages that read a pretraining, the id of that pretraining (the digest of its backbone
weights, :func:`work_id`). ``ftcl stage`` compares
the key a folder was computed under with the new one: same and finished -> nothing to run (the
marker is written again); same and unfinished -> resume (pretraining continues from its
checkpoint); different -> the folder moves to ``.superseded/``, its MLflow run is tagged
``ftcl.superseded``, and the stage starts afresh.
"""

from __future__ import annotations

import json
import sys
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import yaml

from ftcl.constants import PRETRAIN, RESULT_FILES, RUN_ID_FILE
from ftcl.files import write_json

KEY_FILE = ".ftcl_stage.json"
SUPERSEDED_DIR = ".superseded"
CONFIGS_DIR = "configs"


def marker_path(run_dir: str | Path, stage: str) -> Path:
    """The file Snakemake waits for: written when ``stage`` of this row and seed is done."""
    return Path(run_dir) / f"{stage}.done"


def config_path(run_dir: str | Path, stage: str) -> Path:
    return Path(run_dir) / CONFIGS_DIR / f"{stage}.yaml"


def read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def upstream_id(run_dir: str | Path, stage: str) -> str:
    """The id of the pretraining ``stage`` reads ("" for pretraining itself); ConfigError-free: a
    missing pretraining marker gives "" (Snakemake orders the stages, so it exists when needed)."""
    if stage == PRETRAIN:
        return ""
    marker = read_json(marker_path(run_dir, PRETRAIN)) or {}
    return str(marker.get("id", ""))


@dataclass
class Prepared:
    """What :func:`prepare` found: ``fresh`` (no earlier work), ``resume`` (this key's unfinished
    work), ``done`` (this key's finished result) or ``superseded`` (earlier work moved aside)."""

    state: str
    folder: Path
    key: dict[str, str]
    moved_to: Path | None = None
    reason: str = ""


def saved_key(folder: Path, stage: str, upstream: str) -> dict[str, str] | None:
    """The key a folder's work was computed under: its key file, else (a folder written before key
    files existed) the stage digest of the ``config.yaml`` the stage saved, with today's upstream."""
    from ftcl import pipeline

    key = read_json(folder / KEY_FILE)
    if key is not None:
        return {k: str(key.get(k, "")) for k in ("digest", "upstream", "id")}
    saved = folder / "config.yaml"
    if saved.is_file():
        cfg = yaml.safe_load(saved.read_text()) or {}
        try:
            return {"digest": pipeline.stage_digest(cfg, stage), "upstream": upstream, "id": ""}
        except (KeyError, TypeError, ValueError):
            return None
    return None


def _has_work(folder: Path) -> bool:
    return folder.is_dir() and any(folder.iterdir())


def prepare(run_dir: str | Path, stage: str, run_cfg: Mapping, log: TextIO | None = None) -> Prepared:
    """Make ``<run_dir>/<stage>/`` ready for ``run_cfg``: keep it when it holds this key's work,
    move it to ``.superseded/`` when it holds another's (module docstring)."""
    from ftcl import pipeline
    from ftcl.config import to_dict

    run_cfg, run_dir = to_dict(run_cfg), Path(run_dir)
    folder = run_dir / stage
    key = {"digest": pipeline.stage_digest(run_cfg, stage), "upstream": upstream_id(run_dir, stage)}
    if not _has_work(folder):
        folder.mkdir(parents=True, exist_ok=True)
        write_json(folder / KEY_FILE, {**key, "id": ""})
        return Prepared("fresh", folder, {**key, "id": ""})
    saved = saved_key(folder, stage, key["upstream"])
    if saved is not None and saved["digest"] == key["digest"] and saved["upstream"] == key["upstream"]:
        done = (folder / RESULT_FILES[stage]).is_file()
        kept = {**key, "id": saved.get("id") or (uuid.uuid4().hex[:12] if done else "")}
        write_json(folder / KEY_FILE, kept)
        return Prepared("done" if done else "resume", folder, kept)
    reason = _why(folder, stage, run_cfg, saved, key)
    moved = supersede(folder, run_dir, stage, reason, run_cfg, log)
    folder.mkdir(parents=True, exist_ok=True)
    write_json(folder / KEY_FILE, {**key, "id": ""})
    return Prepared("superseded", folder, {**key, "id": ""}, moved, reason)


def _why(folder: Path, stage: str, run_cfg: Mapping, saved: Mapping | None, key: Mapping) -> str:
    from ftcl import pipeline

    if saved is None:
        return "its folder records no settings"
    if saved["upstream"] != key["upstream"]:
        return "the pretraining it read was superseded"
    old = folder / "config.yaml"
    if old.is_file():
        changed = pipeline.changed_keys(yaml.safe_load(old.read_text()) or {}, run_cfg, stage)
        if changed:
            return "settings changed: " + ", ".join(changed[:8]) + (" ..." if len(changed) > 8 else "")
    return "its settings changed"


def supersede(folder: Path, run_dir: Path, stage: str, reason: str, run_cfg: Mapping | None = None,
              log: TextIO | None = None) -> Path:
    """Move ``folder`` to ``<run_dir>/.superseded/<stage>-<UTC time>/`` (a rename: nothing is copied
    or deleted), note why in ``SUPERSEDED.txt`` there, tag its MLflow run; returns the new place."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    target = run_dir / SUPERSEDED_DIR / f"{stage}-{stamp}"
    n = 1
    while target.exists():
        n += 1
        target = run_dir / SUPERSEDED_DIR / f"{stage}-{stamp}-{n}"
    target.parent.mkdir(parents=True, exist_ok=True)
    folder.rename(target)
    (target / "SUPERSEDED.txt").write_text(f"moved here {stamp} from {folder}\nreason: {reason}\n")
    note(f"{stage}: {reason}; the previous results were moved to {target}", log)
    if run_cfg is not None:
        _tag_superseded_run(target, run_cfg, stamp, log, stage)
    return target


def _tag_superseded_run(target: Path, run_cfg: Mapping, stamp: str, log: TextIO | None, stage: str) -> None:
    """Tag the moved folder's MLflow run ``ftcl.superseded`` (it stays in the store, never deleted; its
    headline results no longer show on the row's parent run)."""
    run_id_file = target / RUN_ID_FILE
    tracking = run_cfg.get("tracking") or {}
    if not run_id_file.is_file() or not tracking.get("enabled", True):
        return
    try:
        from mlflow.tracking import MlflowClient

        from ftcl.tracking import supersede_run, tracking_uri

        client = MlflowClient(tracking_uri(tracking.get("uri")))
        supersede_run(client, run_id_file.read_text().strip(), stamp, target)
    except Exception as err:  # bookkeeping only: never stop a stage for it
        note(f"{stage}: warning: the superseded MLflow run was not tagged ({err})", log)


def finish(run_dir: str | Path, stage: str, prepared: Prepared) -> Path:
    """After the stage succeeded: give its work an id (kept for as long as the folder is), write the
    marker Snakemake waits for; returns the marker."""
    run_dir = Path(run_dir)
    result = prepared.folder / RESULT_FILES[stage]
    if not result.is_file():
        raise RuntimeError(f"{stage} ended without writing {result}")
    key = {**prepared.key, "id": prepared.key.get("id") or work_id(stage, result)}
    write_json(prepared.folder / KEY_FILE, key)
    marker = marker_path(run_dir, stage)
    write_json(marker, {"stage": stage, **key, "result": str(result),
                         "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    return marker


def work_id(stage: str, result: Path) -> str:
    """The id of a finished stage's work: for a pretraining, its backbone weights' digest (so a rerun
    that changed only what the weights do not depend on, e.g. ``eval.monitor``, and gave the same
    weights leaves the stages that read it done), else a random id."""
    digest = (read_json(result) or {}).get("backbone_sha256") if stage == PRETRAIN else None
    return f"w{digest[:16]}" if isinstance(digest, str) and digest else uuid.uuid4().hex[:12]


def note(message: str, log: TextIO | None = None) -> None:
    """A line about the stage on stderr and in its log."""
    print(f"ftcl stage: {message}", file=sys.stderr, flush=True)
    if log is not None:
        log.write(f"ftcl stage: {message}\n")
        log.flush()
