"""Row runs as ``ftcl aggregate`` leaves them: each holds the ablation table's numbers of its row.

A row run's metrics are ``<column>/<statistic>`` of the table (:func:`ftcl.results.command.row_run_metrics`:
``linear_top1/mean``, ``linear_top1/delta_low``, ...), logged at a new step each aggregation
(``ftcl.aggregate_step``, time now), so the latest value of each is the current table's; a metric the
current table has no number for (one seed left: no std) is logged as NaN, so the run shows none.

Aggregation also repairs the structure stage jobs keep (:mod:`ftcl.tracking.parents`): it creates a
row run that is missing (a store from before row runs), nests the row's current seed parent runs
that have no row run under it, and merges row runs that stages created at the same instant (the
oldest is kept, the seed parents of the others move to it, the others are deleted). It never
supersedes a row run: stage jobs do that, when the row's settings change.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from typing import Any

from ftcl.constants import PARENT_STAGE, TAG_ROW, TAG_STAGE, TAG_SUPERSEDED
from ftcl.tracking.parents import PARENT_RUN_TAG, close_row_run, current_row_runs, ensure_row_run
from ftcl.tracking.store import retry

#: the tag counting a row run's aggregations: the step its metrics were last logged at
STEP_TAG = "ftcl.aggregate_step"
#: the row a row run's deltas refer to (none for the baseline)
REFERENCE_TAG = "ftcl.reference"


def update_row_run(client, experiment_id: str, row: str, metrics: Mapping[str, float], *,
                   reference: str | None = None, tags: Mapping[str, Any] = (),
                   params: Mapping[str, str] | None = None) -> str:
    """Give ``row``'s row run (created with ``tags`` and ``params`` when missing) ``metrics`` as its
    latest values, and end it unless one of its seed parents runs; returns its id."""
    row_id = ensure_row_run(client, experiment_id, row, tags, params, supersede=False)
    _merge_duplicates(client, experiment_id, row, row_id)
    _adopt_seed_parents(client, experiment_id, row, row_id)
    log_row_metrics(client, row_id, metrics)
    run = retry(client.get_run, row_id)
    if reference:
        retry(client.set_tag, row_id, REFERENCE_TAG, reference)
    elif REFERENCE_TAG in run.data.tags:
        retry(client.delete_tag, row_id, REFERENCE_TAG)
    close_row_run(client, experiment_id, row_id)
    return row_id


def log_row_metrics(client, row_id: str, metrics: Mapping[str, float]) -> int:
    """Log ``metrics`` (NaN values left out) to a row run at its next aggregation step, time now, and
    NaN for each metric it shows that ``metrics`` has no number for; returns the step."""
    from mlflow.entities import Metric

    run = retry(client.get_run, row_id)
    step = int(run.data.tags.get(STEP_TAG, "0") or 0) + 1
    fresh = {k: float(v) for k, v in metrics.items() if not math.isnan(float(v))}
    gone = {k: math.nan for k, v in run.data.metrics.items() if k not in fresh and not math.isnan(v)}
    now = int(time.time() * 1000)
    batch = [Metric(k, v, now, step) for k, v in {**fresh, **gone}.items()]
    for i in range(0, len(batch), 1000):
        retry(client.log_batch, row_id, metrics=batch[i : i + 1000])
    retry(client.set_tag, row_id, STEP_TAG, str(step))
    return step


def _merge_duplicates(client, experiment_id: str, row: str, kept: str) -> None:
    """Row runs of ``row`` besides ``kept`` (stages that created theirs at the same instant): their
    runs move under ``kept`` and they are deleted."""
    for other in current_row_runs(client, experiment_id, row):
        if other.info.run_id == kept:
            continue
        for child in _children(client, experiment_id, other.info.run_id):
            retry(client.set_tag, child.info.run_id, PARENT_RUN_TAG, kept)
        retry(client.delete_run, other.info.run_id)


def _adopt_seed_parents(client, experiment_id: str, row: str, row_id: str) -> None:
    """Nest the current seed parent runs of ``row`` that have no row run above them under ``row_id``."""
    query = f"tags.`{TAG_ROW}` = '{row}' and tags.`{TAG_STAGE}` = '{PARENT_STAGE}'"
    for parent in retry(client.search_runs, [experiment_id], filter_string=query, max_results=1000):
        tags = parent.data.tags
        if TAG_SUPERSEDED not in tags and PARENT_RUN_TAG not in tags:
            retry(client.set_tag, parent.info.run_id, PARENT_RUN_TAG, row_id)


def _children(client, experiment_id: str, run_id: str) -> list:
    return retry(client.search_runs, [experiment_id], filter_string=f"tags.`{PARENT_RUN_TAG}` = '{run_id}'",
                 max_results=1000)
