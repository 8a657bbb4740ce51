"""Reading results into one frame: one line per row x seed with every metric, from the run folders
(:func:`collect`, what ``ftcl aggregate`` uses) or from the MLflow store alone
(:func:`frame_from_mlflow`, what ``ftcl table`` uses).

Run-folder contract (docs/ARCHITECTURE.md): ``<results>/<experiment>/<row>/seed<k>/<stage>/<stage>.json``.
Accuracies and APs are taken as the stage files write them (percent, like the published numbers
they are compared with). A detection result counts only in its dataset's own metric family
(``protocol.primary``: VOC07 AP for VOC-style data, COCO AP for COCO), so a published COCO number is
never compared with COCO-style AP measured on VOC.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from ftcl.constants import PARENT_STAGE, RESULT_FILES, TAG_ROW, TAG_SEED, TAG_STAGE, TAG_SUPERSEDED

log = logging.getLogger(__name__)

#: stage -> {key in its result file (RESULT_FILES): column of the collected frame}
STAGE_METRICS: dict[str, dict[str, str]] = {
    # the last epoch's mean positive and negative scores the loss saw (absent with scores off or 0 epochs)
    "pretrain": {"scores/pos_mean": "scores_pos", "scores/neg_mean": "scores_neg"},
    "linear": {"top1": "linear_top1", "top5": "linear_top5", "top1_last": "linear_top1_last",
               "top1_best": "linear_top1_best"},
    "knn": {"top1": "knn_top1", "top5": "knn_top5"},
    "detection": {"voc07_AP50": "det_voc07_AP50", "voc07_AP": "det_voc07_AP", "voc07_AP75": "det_voc07_AP75",
                  "coco_AP": "det_coco_AP", "coco_AP50": "det_coco_AP50", "coco_AP75": "det_coco_AP75"},
}
METRIC_COLUMNS: list[str] = [col for cols in STAGE_METRICS.values() for col in cols.values()]
#: MLflow metric name (tracking contract) -> column of the collected frame
MLFLOW_METRICS: dict[str, str] = {
    "scores/pos_mean": "scores_pos",
    "scores/neg_mean": "scores_neg",
    "linear/top1": "linear_top1",
    "linear/top5": "linear_top5",
    "linear/top1_last": "linear_top1_last",
    "linear/top1_best": "linear_top1_best",
    "knn/top1": "knn_top1",
    "knn/top5": "knn_top5",
    "det/voc07_AP50": "det_voc07_AP50",
    "det/voc07_AP": "det_voc07_AP",
    "det/voc07_AP75": "det_voc07_AP75",
    "det/coco_AP": "det_coco_AP",
    "det/coco_AP50": "det_coco_AP50",
    "det/coco_AP75": "det_coco_AP75",
}
#: protocol keys left out of summaries: they vary between runs of one protocol or repeat the stage
PROTOCOL_SKIP = frozenset({"kind", "train_seconds", "metrics"})


class ResultsError(ValueError):
    """Results that cannot be aggregated (unreadable file, unknown baseline); the message says which."""


class MissingResultsError(ResultsError, FileNotFoundError):
    """One or more row or seed folders of the pipeline config do not exist."""


def collect(pipe, results_dir: str | Path | None = None, *, allow_missing: bool = False) -> pd.DataFrame:
    """One line per row x seed of ``pipe`` (an :class:`ftcl.pipeline.Pipeline`) with every metric
    the run folders hold.

    Columns: ``row``, ``seed``, the metric columns (:data:`METRIC_COLUMNS`; NaN where a stage left
    no result or is not requested), ``protocol`` (a one-line summary of the evaluation protocols)
    and ``run_dir``. A row or seed folder that does not exist raises :class:`MissingResultsError`
    naming it, unless ``allow_missing`` (then it is skipped with a warning).
    """
    exp_dir = Path(results_dir) / pipe.experiment if results_dir else pipe.exp_dir
    records, missing = [], []
    for row in pipe.row_names:
        row_dir = exp_dir / row
        if not row_dir.is_dir():
            missing.append(f"{row_dir} (row {row!r})")
            continue
        for seed in pipe.seeds:
            seed_dir = row_dir / f"seed{seed}"
            if not seed_dir.is_dir():
                missing.append(f"{seed_dir} (row {row!r}, seed {seed})")
                continue
            records.append(_read_run(row, seed, seed_dir, pipe.stages))
    if missing:
        message = f"no results for experiment {pipe.experiment!r}: missing " + "; ".join(missing)
        if not allow_missing:
            raise MissingResultsError(message + " (run the pipeline for them, or pass --allow-missing)")
        log.warning("%s; aggregating without them", message)
    columns = ["row", "seed", *METRIC_COLUMNS, "protocol", "run_dir"]
    frame = pd.DataFrame.from_records(records, columns=columns)
    frame[METRIC_COLUMNS] = frame[METRIC_COLUMNS].astype(float)
    return frame


def _read_run(row: str, seed: Any, seed_dir: Path, stages: Iterable[str]) -> dict[str, Any]:
    record: dict[str, Any] = {"row": row, "seed": seed, "run_dir": str(seed_dir)}
    protocols = []
    for stage, columns in STAGE_METRICS.items():
        path = seed_dir / stage / RESULT_FILES[stage]
        result = _read_json(path) if stage in stages and path.is_file() else None
        if result is None and stage in stages:
            log.warning("no %s result for row %r seed %s (%s missing)", stage, row, seed, path)
        primary = ((result or {}).get("protocol") or {}).get("primary")
        for key, column in columns.items():
            value = (result or {}).get(key)
            if primary is not None and not key.startswith(primary + "_"):
                value = None  # a detection result counts in its own dataset's metric family only
            record[column] = float(value) if isinstance(value, int | float) else math.nan
        if result and result.get("protocol"):
            protocols.append(f"{stage}: {protocol_summary(result['protocol'])}")
    record["protocol"] = "; ".join(protocols)
    return record


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ResultsError(f"result file {path} cannot be read as JSON: {err}") from err
    if not isinstance(data, dict):
        raise ResultsError(f"result file {path} must hold a JSON object, got {type(data).__name__}")
    return data


def protocol_summary(protocol: Any) -> str:
    """``{"epochs": 60, "optim": {"lr": 30}}`` -> ``"epochs=60, optim.lr=30"``.

    Keys in :data:`PROTOCOL_SKIP` (run-to-run noise such as ``train_seconds``) are left out.
    """
    if not isinstance(protocol, Mapping):
        return str(protocol)
    parts = []
    for key, value in _flat(protocol).items():
        if key in PROTOCOL_SKIP:
            continue
        text = json.dumps(value) if isinstance(value, list | bool) or value is None else str(value)
        parts.append(f"{key}={text}")
    return ", ".join(parts)


def _flat(mapping: Mapping, prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in mapping.items():
        if isinstance(value, Mapping) and value:
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def frame_from_mlflow(tracking_uri: str, experiment: str) -> pd.DataFrame:
    """The :func:`collect` frame rebuilt from the MLflow store alone.

    Every active stage run tagged ``ftcl.row`` and ``ftcl.seed`` (not superseded) contributes its
    metrics (latest value of ``linear/top1``, ``knn/top1``, ``det/voc07_AP50``, ...). Where several
    runs of one row and seed hold a metric, a finished run wins over an unfinished one, then the newest. Rows come in
    the order of their first run; ``protocol`` and ``run_dir`` are empty.
    """
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        names = [e.name for e in client.search_experiments()]
        raise ResultsError(f"no MLflow experiment {experiment!r} in {tracking_uri} "
                           f"(experiments: {', '.join(names) or 'none'})")
    values: list[dict[str, Any]] = []
    token = None
    while True:
        page = client.search_runs([exp.experiment_id], max_results=1000, page_token=token)
        for run in page:
            tags = run.data.tags
            if TAG_ROW not in tags or TAG_SEED not in tags or TAG_SUPERSEDED in tags:
                continue  # not a row's run, or one whose folder was moved aside
            if tags.get(TAG_STAGE) == PARENT_STAGE:
                continue  # a parent run repeats its children's headline metrics
            key = {"row": tags[TAG_ROW], "seed": _seed(tags[TAG_SEED]),
                   "finished": run.info.status == "FINISHED", "start": run.info.start_time or 0}
            values.append({**key, "column": None, "value": math.nan})  # the row x seed exists
            values += [{**key, "column": MLFLOW_METRICS[name], "value": float(value)}
                       for name, value in run.data.metrics.items() if name in MLFLOW_METRICS]
        token = page.token
        if not token:
            break
    columns = ["row", "seed", *METRIC_COLUMNS, "protocol", "run_dir"]
    if not values:
        return pd.DataFrame(columns=columns)
    long = pd.DataFrame(values)
    first_seen = long.groupby(["row", "seed"], sort=False)["start"].min().reset_index()
    first_seen["row_start"] = first_seen.groupby("row")["start"].transform("min")
    keys = first_seen.sort_values(["row_start", "row", "seed"], kind="stable")[["row", "seed"]]
    metrics = (
        long.dropna(subset=["column"])
        .sort_values(["finished", "start"])
        .groupby(["row", "seed", "column"], sort=False)["value"]
        .last()
        .unstack("column")
    )
    frame = keys.merge(metrics.reset_index(), on=["row", "seed"], how="left") if len(metrics) else keys.copy()
    for col in METRIC_COLUMNS:
        frame[col] = frame[col].astype(float) if col in frame else math.nan
    frame["protocol"] = ""
    frame["run_dir"] = ""
    return frame[columns].reset_index(drop=True)


def _seed(text: str) -> Any:
    try:
        return int(text)
    except ValueError:
        return text


def order_rows(frame: pd.DataFrame, row_order: Sequence[str]) -> pd.DataFrame:
    """``frame`` with rows named in ``row_order`` first (in that order), the others after."""
    rank = {name: i for i, name in enumerate(row_order)}
    key = frame["row"].map(lambda r: rank.get(r, len(rank)))
    ordered = frame.assign(_rank=key).sort_values("_rank", kind="stable")
    return ordered.drop(columns="_rank").reset_index(drop=True)
