"""Aggregation: ablation tables, the paper comparison, plots and ``report.html``.

Reads what the pipeline leaves behind (docs/ARCHITECTURE.md, run-folder and pipeline-config
contracts): for every ablation row and seed, ``results/<experiment>/<row>/seed<k>/`` with
``linear/linear.json``, ``knn/knn.json``, ``detection/detection.json`` and ``pretrain/scores/``.
Writes ``results/<experiment>/tables/{ablation,paper}.{csv,md,tex}``, the plots of
:mod:`ftcl.plots` under ``results/<experiment>/plots/`` and ``results/<experiment>/report.html``,
and logs all of them as artifacts of an MLflow run named ``aggregate``.

The table functions are pure (DataFrame in, DataFrame out). For each row and metric the table
holds the mean and the sample standard deviation (ddof=1) over seeds, and
``delta = mean(row) - mean(reference row)``: the reference is the baseline row, or the row a row
names with ``compare_to`` (so BYOL + FA is compared with BYOL, not with the MoCo baseline).
Accuracies and APs are taken as the stage files write
them (percent, like the published numbers they are compared with).

Command line: ``ftcl aggregate --configfile FILE`` (from the run folders) and ``ftcl table``
(the same table from the MLflow store alone).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import shlex
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
from tabulate import tabulate

from ftcl.config import ConfigError, load_yaml
from ftcl.constants import AGGREGATE_STAGE, RESULTS_DIR, TAG_ROW, TAG_SEED, TAG_STAGE

log = logging.getLogger(__name__)

#: stage -> (sub-folder, result file, {key in the file: column of the collected frame})
STAGE_RESULTS: dict[str, tuple[str, str, dict[str, str]]] = {
    "linear": ("linear", "linear.json", {"top1": "linear_top1", "top5": "linear_top5"}),
    "knn": ("knn", "knn.json", {"top1": "knn_top1", "top5": "knn_top5"}),
    "detection": (
        "detection",
        "detection.json",
        {"voc07_AP50": "det_voc07_AP50", "voc07_AP": "det_voc07_AP", "voc07_AP75": "det_voc07_AP75",
         "coco_AP": "det_coco_AP", "coco_AP50": "det_coco_AP50", "coco_AP75": "det_coco_AP75"},
    ),
}
METRIC_COLUMNS: list[str] = [col for _, _, cols in STAGE_RESULTS.values() for col in cols.values()]
#: the metrics of the ablation table, in column order (displays leave out those without values)
TABLE_METRICS: tuple[str, ...] = ("linear_top1", "knn_top1", "det_voc07_AP50", "det_voc07_AP", "det_coco_AP",
                                  "det_coco_AP50")
METRIC_LABELS: dict[str, str] = {
    "linear_top1": "Linear top-1 (%)",
    "linear_top5": "Linear top-5 (%)",
    "knn_top1": "kNN top-1 (%)",
    "knn_top5": "kNN top-5 (%)",
    "det_voc07_AP50": "VOC07 AP50",
    "det_voc07_AP": "VOC07 AP",
    "det_voc07_AP75": "VOC07 AP75",
    "det_coco_AP": "COCO AP",
    "det_coco_AP50": "COCO AP50",
    "det_coco_AP75": "COCO AP75",
}
DELTA_LABELS: dict[str, str] = {
    "linear_top1": "Δ linear",
    "knn_top1": "Δ kNN",
    "det_voc07_AP50": "Δ VOC07 AP50",
    "det_voc07_AP": "Δ VOC07 AP",
    "det_voc07_AP75": "Δ VOC07 AP75",
    "det_coco_AP": "Δ COCO AP",
    "det_coco_AP50": "Δ COCO AP50",
    "det_coco_AP75": "Δ COCO AP75",
}
#: MLflow metric name (tracking contract) -> column of the collected frame
MLFLOW_METRICS: dict[str, str] = {
    "linear/top1": "linear_top1",
    "linear/top5": "linear_top5",
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
AGGREGATE_RUN_NAME = AGGREGATE_STAGE


class ResultsError(ValueError):
    """Results that cannot be aggregated (unreadable file, unknown baseline); the message says which."""


class MissingResultsError(ResultsError, FileNotFoundError):
    """One or more row or seed folders of the pipeline config do not exist."""


# --------------------------------------------------------------------------- pipeline config


def load_pipeline_config(path: str | Path) -> dict[str, Any]:
    """Read a pipeline config (``config/config.yaml``) and check what aggregation relies on."""
    cfg = load_yaml(path)
    ablation_rows(cfg, source=f"pipeline config {path}")
    return cfg


def _pipeline(pipeline_cfg: Mapping, source: str = "pipeline config"):
    from ftcl import pipeline

    return pipeline.load(pipeline_cfg, resolve_runs=False, source=source)


def ablation_rows(pipeline_cfg: Mapping, source: str = "pipeline config") -> list[dict[str, Any]]:
    """The rows of the pipeline config, grids expanded, checked by :mod:`ftcl.pipeline`."""
    return [{"name": r.name, "baseline": r.baseline, "compare_to": r.compare_to, "description": r.description,
             "published": r.published, "group": r.group} for r in _pipeline(pipeline_cfg, source).rows]


def reference_rows(pipeline_cfg: Mapping) -> dict[str, str]:
    """Row -> the row its deltas refer to, for the rows with ``compare_to`` (the others use the baseline)."""
    return {row["name"]: row["compare_to"] for row in ablation_rows(pipeline_cfg) if row.get("compare_to")}


def baseline_row(pipeline_cfg: Mapping) -> str:
    """The row marked ``baseline: true`` (exactly one, :func:`ftcl.pipeline.check_baseline`)."""
    return _pipeline(pipeline_cfg).baseline


def seeds_of(pipeline_cfg: Mapping) -> list[Any]:
    seeds = pipeline_cfg.get("seeds", [0])
    return list(seeds) if isinstance(seeds, list | tuple) else [seeds]


def experiment_dir(pipeline_cfg: Mapping, results_dir: str | Path | None = None) -> Path:
    """``<results_dir>/<experiment>``; ``results_dir`` defaults to the config's (``results``)."""
    return Path(results_dir or pipeline_cfg.get("results_dir") or RESULTS_DIR) / pipeline_cfg["experiment"]


# --------------------------------------------------------------------------- collecting


def collect(
    pipeline_cfg: Mapping, results_dir: str | Path | None = None, *, allow_missing: bool = False
) -> pd.DataFrame:
    """One line per row x seed with every metric the run folders hold.

    Columns: ``row``, ``seed``, the metric columns (:data:`METRIC_COLUMNS`; NaN where a stage left
    no result), ``protocol`` (a one-line summary of the evaluation protocols) and ``run_dir``.
    A row or seed folder that does not exist raises :class:`MissingResultsError` naming it, unless
    ``allow_missing`` (then it is skipped with a warning).
    """
    exp_dir = experiment_dir(pipeline_cfg, results_dir)
    stages = pipeline_cfg.get("stages") or ["pretrain", *STAGE_RESULTS]
    records, missing = [], []
    for row in ablation_rows(pipeline_cfg):
        row_dir = exp_dir / row["name"]
        if not row_dir.is_dir():
            missing.append(f"{row_dir} (row {row['name']!r})")
            continue
        for seed in seeds_of(pipeline_cfg):
            seed_dir = row_dir / f"seed{seed}"
            if not seed_dir.is_dir():
                missing.append(f"{seed_dir} (row {row['name']!r}, seed {seed})")
                continue
            records.append(_read_run(row["name"], seed, seed_dir, stages))
    if missing:
        message = f"no results for experiment {pipeline_cfg['experiment']!r}: missing " + "; ".join(missing)
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
    for stage, (folder, filename, columns) in STAGE_RESULTS.items():
        path = seed_dir / folder / filename
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


# --------------------------------------------------------------------------- tables


def ablation_table(
    df: pd.DataFrame, baseline: str | None, metrics: Sequence[str] = TABLE_METRICS,
    references: Mapping[str, str] | None = None,
) -> pd.DataFrame:
    """One line per row (in the order of ``df``) with, for each metric ``m``:

    ``m_mean``, ``m_std`` (sample std over seeds, ddof=1; NaN for one seed), ``m_delta``
    (``m_mean`` minus the reference row's ``m_mean``) and ``m_n`` (seeds with a value); plus
    ``n_seeds`` (seed folders found), ``reference`` (the row the deltas refer to: ``references[row]``
    if given, else ``baseline``, so the baseline's deltas are 0; None when there is no reference; a
    reference without results gives NaN deltas) and ``protocol`` (the distinct protocol summaries of
    its seeds, joined by `` | ``).
    """
    order = list(dict.fromkeys(df["row"]))
    if baseline is not None and baseline not in order:
        raise ResultsError(
            f"baseline row {baseline!r} has no results (rows with results: {', '.join(order)})"
        )
    references = dict(references or {})
    reference = [references.get(row, baseline) for row in order]
    groups = df.groupby("row", sort=False)
    table = pd.DataFrame({"row": order})
    table["n_seeds"] = groups.size().reindex(order).to_numpy()
    table["reference"] = reference
    for metric in metrics:
        values = df[metric].astype(float) if metric in df else pd.Series(math.nan, index=df.index)
        by_row = values.groupby(df["row"], sort=False)
        mean = by_row.mean().reindex(order)
        table[f"{metric}_mean"] = mean.to_numpy()
        table[f"{metric}_std"] = by_row.std(ddof=1).reindex(order).to_numpy()
        ref_mean = mean.reindex([r if r is not None else "" for r in reference]).to_numpy()
        table[f"{metric}_delta"] = mean.to_numpy() - ref_mean
        table[f"{metric}_n"] = by_row.count().reindex(order).to_numpy()
    protocols = groups["protocol"].agg(lambda s: " | ".join(dict.fromkeys(p for p in s if p)))
    table["protocol"] = protocols.reindex(order).fillna("").to_numpy()
    table.attrs["baseline"] = baseline
    return table


def paper_table(df: pd.DataFrame, pipeline_cfg: Mapping) -> pd.DataFrame:
    """Rows with ``published`` numbers: one line per row x published metric.

    Columns ``row``, ``metric`` (the published key, e.g. ``linear_top1``, ``det_voc07_AP50``), ``ours_mean``,
    ``ours_std``, ``n_seeds`` (seeds with a value), ``published`` and ``difference`` (ours_mean minus
    published). A published key with no matching result column gives NaN for ours.
    """
    lines = []
    for row in ablation_rows(pipeline_cfg):
        published = row.get("published") or {}
        if not isinstance(published, Mapping):
            raise ConfigError(f"pipeline config: row {row['name']!r}: 'published' must map metric -> number")
        for metric, value in published.items():
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ConfigError(f"pipeline config: row {row['name']!r}: published.{metric} "
                                  f"must be a number, got {value!r}")
            if metric in df:
                ours = df.loc[df["row"] == row["name"], metric].dropna()
            else:
                ours = pd.Series(dtype=float)
            mean = float(ours.mean()) if len(ours) else math.nan
            lines.append({
                "row": row["name"],
                "metric": metric,
                "ours_mean": mean,
                "ours_std": float(ours.std(ddof=1)) if len(ours) > 1 else math.nan,
                "n_seeds": len(ours),
                "published": float(value),
                "difference": mean - float(value),
            })
    columns = ["row", "metric", "ours_mean", "ours_std", "n_seeds", "published", "difference"]
    return pd.DataFrame(lines, columns=columns)


def _number(value: float, digits: int, signed: bool = False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


def _mean_std(mean: float, std: float, n: int, n_seeds: int, digits: int, latex: bool) -> str:
    if math.isnan(mean):
        return "–"
    text = f"{mean:.{digits}f}"
    if not math.isnan(std):
        text = f"${text} \\pm {std:.{digits}f}$" if latex else f"{text} ± {std:.{digits}f}"
    if n < n_seeds:
        text += f" ({n}/{n_seeds} seeds)"
    return text


def present_metrics(table: pd.DataFrame, metrics: Sequence[str] = TABLE_METRICS) -> list[str]:
    """The metrics with at least one value in the ablation table (the others are left out of displays)."""
    return [m for m in metrics if f"{m}_mean" in table and table[f"{m}_mean"].notna().any()]


_STAGE_SPLIT = re.compile("; (?=(?:" + "|".join(STAGE_RESULTS) + "): )")


def shared_protocol(table: pd.DataFrame) -> str | None:
    """The protocol summary when no two rows disagree on a stage's protocol, else None.

    A row without a stage (e.g. no detection yet) does not disagree with the others.
    """
    by_stage: dict[str, set[str]] = {}
    for text in table["protocol"]:
        for part in _STAGE_SPLIT.split(text) if text else []:
            stage, _, summary = part.partition(": ")
            by_stage.setdefault(stage, set()).add(summary)
    if any(len(summaries) > 1 for summaries in by_stage.values()):
        return None
    return "; ".join(f"{stage}: {summaries.pop()}" for stage, summaries in by_stage.items()) or None


def display_ablation(table: pd.DataFrame, digits: int = 2, latex: bool = False) -> pd.DataFrame:
    """The ablation table as strings for people: ``mean ± std`` cells, signed deltas.

    Metrics with no value at all are left out; the protocol column is kept only when rows differ
    (else :func:`table_notes` states it once). The first column is the row name.
    """
    baseline = table.attrs.get("baseline")
    metrics = present_metrics(table)
    shown = pd.DataFrame({"Row": table["row"], "Seeds": table["n_seeds"].astype(str)})
    has_deltas = baseline is not None or table["reference"].notna().any()
    if _other_references(table):
        shown["Δ vs"] = ["" if r["row"] == baseline else (r["reference"] or "–") for _, r in table.iterrows()]
    for m in metrics:
        shown[METRIC_LABELS[m]] = [
            _mean_std(r[f"{m}_mean"], r[f"{m}_std"], r[f"{m}_n"], r["n_seeds"], digits, latex)
            for _, r in table.iterrows()
        ]
        if has_deltas:
            shown[DELTA_LABELS.get(m, f"Δ {m}")] = [
                "baseline" if r["row"] == baseline else _number(r[f"{m}_delta"], digits, signed=True)
                for _, r in table.iterrows()
            ]
    if shared_protocol(table) is None:
        shown["Protocol"] = table["protocol"]
    return shown


def _other_references(table: pd.DataFrame) -> bool:
    """Whether some row's deltas refer to a row other than the baseline (``compare_to``)."""
    baseline = table.attrs.get("baseline")
    return any(ref is not None and ref != baseline for ref in table["reference"])


def table_notes(table: pd.DataFrame) -> list[str]:
    """One-line notes printed under the ablation table (what ± and Δ mean, the shared protocol)."""
    notes = ["mean ± sample std (ddof=1) over seeds"]
    baseline = table.attrs.get("baseline")
    if _other_references(table):
        notes.append("Δ: difference of the mean to the row in column 'Δ vs'"
                     + (f" (the baseline row is {baseline})" if baseline is not None else ""))
    elif baseline is not None:
        notes.append(f"Δ: difference of the mean to the baseline row {baseline}")
    protocol = shared_protocol(table)
    if protocol:
        notes.append(f"protocol: {protocol}")
    return notes


def display_paper(paper: pd.DataFrame, digits: int = 2, latex: bool = False) -> pd.DataFrame:
    """The paper comparison as strings: ours (mean ± std), published, difference."""
    return pd.DataFrame({
        "Row": paper["row"],
        "Metric": [METRIC_LABELS.get(m, m) for m in paper["metric"]],
        "Ours": [
            _mean_std(r["ours_mean"], r["ours_std"], r["n_seeds"], r["n_seeds"], digits, latex)
            for _, r in paper.iterrows()
        ],
        "Seeds": paper["n_seeds"].astype(str),
        "Published": [_number(v, digits) for v in paper["published"]],
        "Ours − published": [_number(v, digits, signed=True) for v in paper["difference"]],
    })


TEXT_COLUMNS = frozenset({"Row", "Metric", "Protocol"})  # left-aligned; numbers are right-aligned


def to_markdown(shown: pd.DataFrame, notes: Sequence[str] = ()) -> str:
    align = ["left" if col in TEXT_COLUMNS else "right" for col in shown.columns]
    text = tabulate(shown, headers="keys", tablefmt="pipe", showindex=False, disable_numparse=True,
                    colalign=align)
    return text + "".join(f"\n\n{note}" if i == 0 else f"\n{note}" for i, note in enumerate(notes)) + "\n"


_LATEX_ESCAPES = {
    "\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
    "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
    "Δ": r"$\Delta$", "±": r"$\pm$", "–": "--", "−": "$-$",
}


def latex_escape(text: str) -> str:
    return "".join(_LATEX_ESCAPES.get(ch, ch) for ch in str(text))


def to_latex(shown: pd.DataFrame, notes: Sequence[str] = (), math_columns: Iterable[str] = ()) -> str:
    """A booktabs ``tabular`` (needs ``\\usepackage{booktabs}``), to ``\\input`` inside a table float.

    Cells of ``math_columns`` already hold LaTeX (``$m \\pm s$``) and are not escaped.
    """
    math_columns = set(math_columns)
    align = "".join("l" if col in TEXT_COLUMNS else "r" for col in shown.columns)
    lines = [f"% {latex_escape(note)}" for note in notes]
    lines += [f"\\begin{{tabular}}{{{align}}}", r"\toprule"]
    lines.append(" & ".join(latex_escape(col) for col in shown.columns) + r" \\")
    lines.append(r"\midrule")
    for _, r in shown.iterrows():
        cells = [
            str(r[col]).replace(" (", r" \,(", 1) if col in math_columns and str(r[col]).startswith("$")
            else latex_escape(r[col])
            for col in shown.columns
        ]
        lines.append(" & ".join(cells) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(lines) + "\n"


def write_tables(
    table: pd.DataFrame, paper: pd.DataFrame | None, tables_dir: str | Path, digits: int = 2
) -> list[Path]:
    """Write ``ablation.{csv,md,tex}`` and, when ``paper`` has lines, ``paper.{csv,md,tex}``.

    CSV holds the full-precision numbers; Markdown and LaTeX the rounded display tables.
    """
    tables_dir = Path(tables_dir)
    tables_dir.mkdir(parents=True, exist_ok=True)
    written = []
    notes = table_notes(table)
    tex_math = [METRIC_LABELS[m] for m in present_metrics(table)]
    outputs = {
        "ablation.csv": table.to_csv(index=False, float_format="%.4f"),
        "ablation.md": to_markdown(display_ablation(table, digits), notes),
        "ablation.tex": to_latex(display_ablation(table, digits, latex=True), notes, tex_math),
    }
    if paper is not None and len(paper):
        outputs |= {
            "paper.csv": paper.to_csv(index=False, float_format="%.4f"),
            "paper.md": to_markdown(display_paper(paper, digits)),
            "paper.tex": to_latex(display_paper(paper, digits, latex=True), (), ["Ours"]),
        }
    for name, text in outputs.items():
        path = tables_dir / name
        path.write_text(text)
        written.append(path)
    return written


# --------------------------------------------------------------------------- the aggregate command


def run_aggregate(
    pipeline_cfg: Mapping,
    results_dir: str | Path | None = None,
    *,
    allow_missing: bool = False,
    mlflow: bool = True,
    command: str = "ftcl aggregate",
    configfile: str | Path | None = None,
) -> dict[str, Any]:
    """Collect, write tables, plots and the report, and (``mlflow``) log them to an ``aggregate`` run.

    Returns ``{"frame", "ablation", "paper", "files", "report", "run_id"}``.
    """
    from ftcl import plots, report

    exp_dir = experiment_dir(pipeline_cfg, results_dir)
    frame = collect(pipeline_cfg, results_dir, allow_missing=allow_missing)
    if frame.empty:
        raise MissingResultsError(
            f"no row of experiment {pipeline_cfg['experiment']!r} has results under {exp_dir}"
        )
    baseline = baseline_row(pipeline_cfg)
    if baseline not in set(frame["row"]):
        log.warning("baseline row %r has no results: the table has no deltas", baseline)
        baseline = None
    references = {row: ref for row, ref in reference_rows(pipeline_cfg).items() if ref in set(frame["row"])}
    table = ablation_table(frame, baseline, references=references)
    paper = paper_table(frame, pipeline_cfg)
    files = write_tables(table, paper, exp_dir / "tables")
    plot_files = plots.make_plots(frame, exp_dir / "plots", baseline=baseline)
    files += list(plot_files.values())
    descriptions = {row["name"]: row.get("description") or "" for row in ablation_rows(pipeline_cfg)}
    report_path = report.write_report(
        exp_dir / "report.html",
        experiment=pipeline_cfg["experiment"],
        ablation=display_ablation(table),
        ablation_notes=table_notes(table),
        paper=display_paper(paper) if len(paper) else None,
        plots=plot_files,
        command=command,
        descriptions=descriptions,
    )
    files.append(report_path)
    run_id = None
    if mlflow:
        run_id = log_aggregate_run(pipeline_cfg, results_dir, exp_dir, configfile)
    return {"frame": frame, "ablation": table, "paper": paper, "files": files, "report": report_path,
            "run_id": run_id}


def pipeline_tracking_uri(pipeline_cfg: Mapping, results_dir: str | Path | None = None) -> str:
    """``tracking.uri`` of the pipeline config, else ``sqlite:///<abs results_dir>/mlflow.db``."""
    from ftcl.tracking import tracking_uri

    uri = (pipeline_cfg.get("tracking") or {}).get("uri")
    return tracking_uri(uri, Path(results_dir or pipeline_cfg.get("results_dir") or RESULTS_DIR))


def log_aggregate_run(
    pipeline_cfg: Mapping, results_dir: str | Path | None, exp_dir: Path, configfile: str | Path | None = None
) -> str:
    """Log ``tables/``, ``plots/`` and ``report.html`` of ``exp_dir`` to a new run named ``aggregate``.

    Earlier ``aggregate`` runs of the experiment are then marked deleted (MLflow's soft delete),
    so the UI shows one, with the current artifacts. Returns the new run's id.
    """
    from mlflow.tracking import MlflowClient

    from ftcl.tracking import artifact_root, get_or_create_experiment, git_commit

    uri = pipeline_tracking_uri(pipeline_cfg, results_dir)
    experiment = pipeline_cfg["experiment"]
    client = MlflowClient(uri)
    root = (pipeline_cfg.get("tracking") or {}).get("artifact_root")
    experiment_id = get_or_create_experiment(client, experiment, artifact_root(root, uri, experiment))
    previous = client.search_runs(
        [experiment_id], filter_string=f"tags.`{TAG_STAGE}` = '{AGGREGATE_RUN_NAME}'", max_results=1000
    )
    rows = [row["name"] for row in ablation_rows(pipeline_cfg)]
    run = client.create_run(
        experiment_id,
        run_name=AGGREGATE_RUN_NAME,
        tags={
            TAG_STAGE: AGGREGATE_RUN_NAME,
            "ftcl.git_commit": git_commit(),
            "mlflow.note.content": f"Ablation tables, plots and report.html of {experiment}: rows "
            + ", ".join(rows),
        },
    )
    run_id = run.info.run_id
    try:
        client.log_param(run_id, "rows", ", ".join(rows)[:6000])
        client.log_param(run_id, "seeds", ", ".join(map(str, seeds_of(pipeline_cfg))))
        client.log_param(run_id, "baseline", baseline_row(pipeline_cfg))
        for sub in ("tables", "plots"):
            if (exp_dir / sub).is_dir():
                client.log_artifacts(run_id, str(exp_dir / sub), sub)
        client.log_artifact(run_id, str(exp_dir / "report.html"))
        if configfile is not None and Path(configfile).is_file():
            client.log_artifact(run_id, str(configfile), "config")
    except BaseException:
        client.set_terminated(run_id, status="FAILED")
        raise
    client.set_terminated(run_id, status="FINISHED")
    for old in previous:
        client.delete_run(old.info.run_id)
    return run_id


def cmd_aggregate(args: argparse.Namespace) -> int:
    cfg = load_pipeline_config(args.configfile)
    command = ["ftcl", "aggregate", "--configfile", str(args.configfile)]
    if args.results_dir:
        command += ["--results-dir", str(args.results_dir)]
    command += ["--allow-missing"] * args.allow_missing + ["--no-mlflow"] * args.no_mlflow
    try:
        out = run_aggregate(
            cfg,
            args.results_dir,
            allow_missing=args.allow_missing,
            mlflow=not args.no_mlflow,
            command=shlex.join(command),
            configfile=args.configfile,
        )
    except ResultsError as err:
        print(f"ftcl aggregate: error: {err}", file=sys.stderr)
        return 2
    table = out["ablation"]
    print(f"Ablation table of {cfg['experiment']}:\n")
    print(to_markdown(display_ablation(table), table_notes(table)))
    if len(out["paper"]):
        print("Comparison with published numbers:\n")
        print(to_markdown(display_paper(out["paper"])))
    exp_dir = experiment_dir(cfg, args.results_dir)
    print(f"tables and plots: {exp_dir / 'tables'}, {exp_dir / 'plots'}")
    print(f"report: {out['report']}")
    if out["run_id"]:
        uri = pipeline_tracking_uri(cfg, args.results_dir)
        print(f"MLflow run {AGGREGATE_RUN_NAME!r}: {out['run_id']} ({uri})")
    return 0


# --------------------------------------------------------------------------- `ftcl table` (MLflow)


def frame_from_mlflow(tracking_uri: str, experiment: str) -> pd.DataFrame:
    """The :func:`collect` frame rebuilt from the MLflow store alone.

    Every active run tagged ``ftcl.row`` and ``ftcl.seed`` contributes its metrics (latest value of
    ``linear/top1``, ``knn/top1``, ``det/voc07_AP50``, ``det/voc07_AP``, ...). Where several runs of one row and
    seed hold a metric, a finished run wins over an unfinished one, then the newest. Rows come in
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
            if TAG_ROW not in tags or TAG_SEED not in tags:
                continue
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


def _sqlite_path(uri: str) -> Path | None:
    return Path(uri.removeprefix("sqlite:///")) if uri.startswith("sqlite:///") else None


def cmd_table(args: argparse.Namespace) -> int:
    cfg: Mapping = {}
    configfile = args.configfile
    if configfile is None and Path("config/config.yaml").is_file():
        configfile = "config/config.yaml"
    if configfile is not None:
        cfg = load_pipeline_config(configfile)
    experiment = args.experiment or cfg.get("experiment")
    uri = args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if uri is None:  # as pipeline_tracking_uri, without creating the results folder
        results = Path(cfg.get("results_dir") or RESULTS_DIR).resolve()
        uri = (cfg.get("tracking") or {}).get("uri") or f"sqlite:///{results / 'mlflow.db'}"
    db = _sqlite_path(uri)
    if db is not None and not db.is_file():
        raise FileNotFoundError(f"no MLflow store at {db} (give --tracking-uri, or run the pipeline first)")
    try:
        if experiment is None:
            raise ResultsError("name the experiment with --experiment (or give --configfile)")
        frame = frame_from_mlflow(uri, experiment)
        if frame.empty:
            raise ResultsError(f"experiment {experiment!r} has no runs tagged ftcl.row/ftcl.seed in {uri}")
        same_experiment = cfg.get("experiment") == experiment
        if same_experiment:
            frame = order_rows(frame, [row["name"] for row in ablation_rows(cfg)])
        baseline = args.baseline or (baseline_row(cfg) if same_experiment else frame["row"].iloc[0])
        references = reference_rows(cfg) if same_experiment and not args.baseline else {}
        table = ablation_table(frame, baseline if baseline in set(frame["row"]) else None,
                               references={r: ref for r, ref in references.items() if ref in set(frame["row"])})
        if args.baseline and table.attrs["baseline"] is None:
            rows = ", ".join(table["row"])
            raise ResultsError(f"baseline row {args.baseline!r} has no runs (rows: {rows})")
    except ResultsError as err:
        print(f"ftcl table: error: {err}", file=sys.stderr)
        return 2
    print(f"Ablation table of {experiment} (MLflow store {uri}):\n")
    print(to_markdown(display_ablation(table), table_notes(table)))
    return 0


def register_cli(subparsers: argparse._SubParsersAction) -> None:
    """Add ``ftcl aggregate`` and ``ftcl table``."""
    agg = subparsers.add_parser(
        "aggregate",
        help="ablation tables, paper comparison, plots and report.html from the run folders",
        description="Aggregate every row and seed of a pipeline config into results/<experiment>/tables/ "
        "(ablation and paper-comparison tables as CSV, Markdown and LaTeX), results/<experiment>/plots/ "
        "and results/<experiment>/report.html, print the ablation table, and log them all as artifacts "
        "of an MLflow run named 'aggregate'.",
    )
    agg.add_argument("--configfile", required=True, help="the pipeline config (e.g. config/config.yaml)")
    agg.add_argument("--results-dir", default=None, help="results folder (default: the config's results_dir)")
    agg.add_argument("--allow-missing", action="store_true",
                     help="skip rows and seeds whose run folder does not exist instead of failing")
    agg.add_argument("--no-mlflow", action="store_true", help="do not log the outputs to MLflow")
    agg.set_defaults(func=cmd_aggregate)

    tab = subparsers.add_parser(
        "table",
        help="print the ablation table from the MLflow store",
        description="Print the ablation table of an experiment from the MLflow store alone (runs tagged "
        "ftcl.row and ftcl.seed, metrics linear/top1, knn/top1, det/voc07_AP50, det/voc07_AP, ...), without reading "
        "the results folders.",
    )
    tab.add_argument("--experiment", default=None,
                     help="MLflow experiment (default: the config's experiment)")
    tab.add_argument("--tracking-uri", default=None,
                     help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else the config's store, "
                     "else sqlite:///results/mlflow.db)")
    tab.add_argument("--configfile", default=None,
                     help="pipeline config for the experiment name, row order and baseline "
                     "(default: config/config.yaml when it exists)")
    tab.add_argument("--baseline", default=None,
                     help="row the deltas refer to (default: the config's baseline, else the first row)")
    tab.set_defaults(func=cmd_table)
