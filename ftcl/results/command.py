"""``ftcl aggregate`` (tables, plots and report.html from the run folders, logged to MLflow) and
``ftcl table`` (the ablation table from the MLflow store alone).

Outputs under ``results/<experiment>/``: ``tables/ablation.{csv,md,tex}`` (every row with mean ± std
and its paired difference to its reference with a 95 % interval), ``tables/paper.*`` (rows with
published numbers), ``tables/floor.*`` (every row against the ``role: floor`` row), ``plots/`` and
``report.html``; all of them are logged as artifacts of a new MLflow run named ``aggregate``
(earlier aggregate runs are tagged superseded, never deleted). Each row's row run gets the table's
numbers of its row as metrics (:func:`row_run_metrics`, :mod:`ftcl.tracking.rows`).
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import shlex
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from ftcl.constants import AGGREGATE_STAGE, RESULTS_DIR, TAG_STAGE, TAG_SUPERSEDED
from ftcl.results import render, stats
from ftcl.results.read import MissingResultsError, ResultsError, collect, frame_from_mlflow, order_rows

log = logging.getLogger(__name__)


def load_pipeline(path: str | Path):
    """The :class:`ftcl.pipeline.Pipeline` of a pipeline config file (rows only: no dataset is needed)."""
    from ftcl import pipeline

    return pipeline.read(path, resolve_runs=False)


#: frame columns whose mean, std and seed count the row runs also get (not a column of the printed
#: table): the last pretraining epoch's mean positive and negative scores
ROW_RUN_EXTRA: tuple[str, ...] = ("scores_pos", "scores_neg")
#: the ablation table's statistics a row run gets, per metric (``<metric>_<statistic>`` in the table,
#: ``<metric>/<statistic>`` on the run); deltas only where the row has a reference row
ROW_RUN_STATS: tuple[str, ...] = ("mean", "std", "n")
ROW_RUN_DELTAS: tuple[str, ...] = ("delta", "delta_low", "delta_high")


def tables(frame: pd.DataFrame, pipe) -> dict[str, pd.DataFrame | None]:
    """The ablation, paper and floor tables of a collected ``frame`` (pure), and ``extra``: the
    table's statistics of :data:`ROW_RUN_EXTRA` (None when the frame has none of them)."""
    present = set(frame["row"])
    baseline = pipe.baseline if pipe.baseline in present else None
    if baseline is None:
        log.warning("baseline row %r has no results: the table has no deltas", pipe.baseline)
    references = {row: ref for row, ref in pipe.references.items() if ref in present}
    groups = {row.name: row.group for row in pipe.rows}
    table = stats.ablation_table(frame, baseline, render.TABLE_METRICS, references, groups)
    paper = stats.paper_table(frame, {row.name: row.published for row in pipe.rows if row.published})
    floor_row = pipe.role("floor")
    floor = stats.against(frame, floor_row, render.FLOOR_METRICS) if floor_row in present else None
    extra_metrics = [column for column in ROW_RUN_EXTRA if column in frame]
    extra = stats.ablation_table(frame, baseline, extra_metrics, references, groups) if extra_metrics else None
    return {"ablation": table, "paper": paper, "floor": floor, "extra": extra}


def row_run_metrics(table: pd.DataFrame, extra: pd.DataFrame | None = None) -> dict[str, dict[str, float]]:
    """Row -> the metrics of its row run (pure): for each headline metric of ``table`` (the ablation
    table, :data:`render.TABLE_METRICS`) that the row has a value of, ``<metric>/mean``, ``/std`` and
    ``/n`` and, against its reference row, ``/delta``, ``/delta_low`` and ``/delta_high``: the table's
    numbers, NaN left out. ``extra`` (:func:`tables`) adds the mean, std and n of its metrics."""
    out: dict[str, dict[str, float]] = {}
    for source, metrics, statistics in ((table, render.TABLE_METRICS, ROW_RUN_STATS + ROW_RUN_DELTAS),
                                        (extra, ROW_RUN_EXTRA, ROW_RUN_STATS)):
        if source is None:
            continue
        for _, line in source.iterrows():
            mine = out.setdefault(line["row"], {})
            for metric in metrics:
                if f"{metric}_n" not in line or not line[f"{metric}_n"]:
                    continue  # no seed of the row has this metric
                for statistic in statistics:
                    value = float(line[f"{metric}_{statistic}"])
                    if not math.isnan(value):
                        mine[f"{metric}/{statistic}"] = value
    return out


def run_aggregate(pipe, results_dir: str | Path | None = None, *, allow_missing: bool = False, mlflow: bool = True,
                  command: str = "ftcl aggregate", configfile: str | Path | None = None) -> dict[str, Any]:
    """Collect, write tables, plots and the report, and (``mlflow``) log them to an ``aggregate`` run.

    Returns ``{"frame", "ablation", "paper", "floor", "files", "report", "run_id"}``.
    """
    from ftcl.results import plots, report

    exp_dir = Path(results_dir) / pipe.experiment if results_dir else pipe.exp_dir
    frame = collect(pipe, results_dir, allow_missing=allow_missing)
    if frame.empty:
        raise MissingResultsError(f"no row of experiment {pipe.experiment!r} has results under {exp_dir}")
    out = tables(frame, pipe)
    table, paper, floor = out["ablation"], out["paper"], out["floor"]
    files = render.write_tables(table, paper, floor, exp_dir / "tables")
    plot_files = plots.make_plots(frame, exp_dir / "plots", table)
    files += list(plot_files.values())
    report_path = report.write_report(
        exp_dir / "report.html",
        experiment=pipe.experiment,
        ablation=render.display_ablation(table),
        ablation_notes=render.table_notes(table),
        paper=render.display_paper(paper, protocols=table["protocol"]) if len(paper) else None,
        floor=render.display_against(floor) if floor is not None and len(floor) else None,
        floor_notes=render.floor_table_notes(floor) if floor is not None and len(floor) else (),
        plots=plot_files,
        command=command,
        descriptions={row.name: row.description for row in pipe.rows},
    )
    files.append(report_path)
    run_id = log_aggregate_run(pipe, results_dir, exp_dir, configfile,
                               rows=row_run_metrics(table, out["extra"])) if mlflow else None
    return {"frame": frame, **out, "files": files, "report": report_path, "run_id": run_id}


def pipeline_tracking_uri(pipe, results_dir: str | Path | None = None) -> str:
    """``tracking.uri`` of the pipeline config, else ``sqlite:///<abs results_dir>/mlflow.db``: the store
    the pipeline gave its stages (:func:`ftcl.pipeline.load`), whatever ``$MLFLOW_TRACKING_URI`` says."""
    from ftcl.tracking import tracking_uri

    return tracking_uri(pipe.config["tracking"]["uri"], Path(results_dir) if results_dir else pipe.results_dir,
                        environment=False)


def log_aggregate_run(pipe, results_dir: str | Path | None, exp_dir: Path, configfile: str | Path | None = None,
                      rows: Mapping[str, Mapping[str, float]] | None = None) -> str:
    """Log ``tables/``, ``plots/`` and ``report.html`` of ``exp_dir`` to a new run named ``aggregate``,
    and give each row's row run its ``rows`` metrics (:func:`row_run_metrics`; :func:`update_row_runs`).

    Earlier ``aggregate`` runs of the experiment are tagged ``ftcl.superseded`` (kept, never deleted),
    so the newest untagged one holds the current tables. Returns the new run's id.
    """
    import time

    from mlflow.tracking import MlflowClient

    from ftcl.tracking import artifact_root, get_or_create_experiment, git_commit

    uri = pipeline_tracking_uri(pipe, results_dir)
    client = MlflowClient(uri)
    experiment_id = get_or_create_experiment(
        client, pipe.experiment, artifact_root(pipe.config["tracking"]["artifact_root"], uri, pipe.experiment))
    previous = client.search_runs([experiment_id], filter_string=f"tags.`{TAG_STAGE}` = '{AGGREGATE_STAGE}'",
                                  max_results=1000)
    run = client.create_run(experiment_id, run_name=AGGREGATE_STAGE, tags={
        TAG_STAGE: AGGREGATE_STAGE, "ftcl.git_commit": git_commit(),
        "mlflow.note.content": f"Ablation tables, plots and report.html of {pipe.experiment}: rows "
        + ", ".join(pipe.row_names)})
    run_id = run.info.run_id
    try:
        client.log_param(run_id, "rows", ", ".join(pipe.row_names)[:6000])
        client.log_param(run_id, "seeds", ", ".join(map(str, pipe.seeds)))
        client.log_param(run_id, "baseline", pipe.baseline)
        for sub in ("tables", "plots"):
            if (exp_dir / sub).is_dir():
                client.log_artifacts(run_id, str(exp_dir / sub), sub)
        client.log_artifact(run_id, str(exp_dir / "report.html"))
        if configfile is not None and Path(configfile).is_file():
            client.log_artifact(run_id, str(configfile), "config")
        if rows is not None:
            update_row_runs(client, experiment_id, pipe, rows)
    except BaseException:
        client.set_terminated(run_id, status="FAILED")
        raise
    client.set_terminated(run_id, status="FINISHED")
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    for old in previous:
        if TAG_SUPERSEDED not in old.data.tags:
            client.set_tag(old.info.run_id, TAG_SUPERSEDED, stamp)
    return run_id


def update_row_runs(client, experiment_id: str, pipe, rows: Mapping[str, Mapping[str, float]]) -> dict[str, str]:
    """Give the row run of each row of ``pipe`` that has results its ``rows`` metrics (created, with
    the row's description and overrides, when missing); returns row -> row run id."""
    from ftcl.pipeline import row_description
    from ftcl.tracking import git_commit
    from ftcl.tracking.parents import NOTE_TAG, row_run_description
    from ftcl.tracking.rows import update_row_run

    params = _row_params(pipe)
    references = pipe.references
    ids = {}
    for row in pipe.rows:
        if row.name not in rows:
            continue  # no results (--allow-missing): its row run, if any, is left as it is
        reference = references.get(row.name)
        ids[row.name] = update_row_run(
            client, experiment_id, row.name, rows[row.name], reference=reference if reference in rows else None,
            tags={"ftcl.git_commit": git_commit(),
                  NOTE_TAG: row_run_description(row.name, pipe.experiment, row_description(row))},
            params=params.get(row.name))
    return ids


def _row_params(pipe) -> dict[str, dict[str, str]]:
    """Row -> its row run's params (the row's overrides, valued as its stages' run config has them,
    as the stages write them); empty when the rows' run configs cannot be resolved here."""
    from ftcl import config as runconfig
    from ftcl import pipeline
    from ftcl.errors import ConfigError
    from ftcl.tracking.parents import row_params

    try:
        resolved = pipe if pipe.run_configs else pipeline.load(pipe.config, check_paths=False)
    except (ConfigError, OSError) as err:
        log.warning("row runs created without params: the rows' run configs do not resolve here (%s)", err)
        return {}
    return {row.name: row_params(runconfig.to_dict(resolved.run_configs[row.name]), row.overrides)
            for row in pipe.rows if row.name in resolved.run_configs}


def cmd_aggregate(args: argparse.Namespace) -> int:
    pipe = load_pipeline(args.configfile)
    command = ["ftcl", "aggregate", "--configfile", str(args.configfile)]
    if args.results_dir:
        command += ["--results-dir", str(args.results_dir)]
    command += ["--allow-missing"] * args.allow_missing + ["--no-mlflow"] * args.no_mlflow
    try:
        out = run_aggregate(pipe, args.results_dir, allow_missing=args.allow_missing, mlflow=not args.no_mlflow,
                            command=shlex.join(command), configfile=args.configfile)
    except ResultsError as err:
        print(f"ftcl aggregate: error: {err}", file=sys.stderr)
        return 2
    table = out["ablation"]
    print(f"Ablation table of {pipe.experiment}:\n")
    print(render.to_markdown(render.display_ablation(table), render.table_notes(table)))
    if out["floor"] is not None and len(out["floor"]):
        print("Against the floor:\n")
        print(render.to_markdown(render.display_against(out["floor"]), render.floor_table_notes(out["floor"])))
    if len(out["paper"]):
        print("Comparison with published numbers:\n")
        print(render.to_markdown(render.display_paper(out["paper"], protocols=table["protocol"])))
    exp_dir = Path(args.results_dir) / pipe.experiment if args.results_dir else pipe.exp_dir
    print(f"tables and plots: {exp_dir / 'tables'}, {exp_dir / 'plots'}")
    print(f"report: {out['report']}")
    if out["run_id"]:
        print(f"MLflow run {AGGREGATE_STAGE!r}: {out['run_id']} ({pipeline_tracking_uri(pipe, args.results_dir)})")
    return 0


def _sqlite_path(uri: str) -> Path | None:
    return Path(uri.removeprefix("sqlite:///")) if uri.startswith("sqlite:///") else None


def cmd_table(args: argparse.Namespace) -> int:
    configfile = args.configfile
    if configfile is None and Path("config/config.yaml").is_file():
        configfile = "config/config.yaml"
    pipe = load_pipeline(configfile) if configfile is not None else None
    cfg: Mapping = pipe.config if pipe is not None else {}
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
        same = pipe is not None and pipe.experiment == experiment
        if same:
            frame = order_rows(frame, pipe.row_names)
        baseline = args.baseline or (pipe.baseline if same else frame["row"].iloc[0])
        if baseline not in set(frame["row"]):
            if args.baseline:
                rows = ", ".join(dict.fromkeys(frame["row"]))
                raise ResultsError(f"baseline row {args.baseline!r} has no runs (rows: {rows})")
            baseline = None
        references = {r: ref for r, ref in pipe.references.items() if ref in set(frame["row"])} \
            if same and not args.baseline else {}
        table = stats.ablation_table(frame, baseline, render.TABLE_METRICS, references)
    except ResultsError as err:
        print(f"ftcl table: error: {err}", file=sys.stderr)
        return 2
    print(f"Ablation table of {experiment} (MLflow store {uri}):\n")
    print(render.to_markdown(render.display_ablation(table), render.table_notes(table)))
    return 0
