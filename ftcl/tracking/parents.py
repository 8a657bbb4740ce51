"""Row runs and row x seed parent runs: what rows are compared on in the MLflow UI.

Each row has one top-level **row run** (named after the row, ``ftcl.stage: row``) holding the row's
overrides as params; ``ftcl aggregate`` gives it the ablation table's numbers as metrics
(:mod:`ftcl.tracking.rows`). Under it, each **parent run** (``<row> · seed <k>``) holds ``seed`` and the
row's overrides as params (``tracking.tags.overrides``, JSON) and, as metrics, the latest headline
result of its stages (:data:`HEADLINE_METRICS`), which a stage's ``log_metrics`` also logs to the parent
(at step 0, so the value logged last is the one shown). A superseded stage run (``ftcl.superseded``)
feeds its parent nothing. Stage runs nest under their parent run (``mlflow.parentRunId``).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ftcl.constants import PARENT_STAGE, ROW_STAGE, TAG_ROW, TAG_SEED, TAG_STAGE, TAG_SUPERSEDED
from ftcl.errors import TrackingError
from ftcl.tracking.store import retry

#: the metrics a stage run also logs to its row x seed parent run (latest value wins there)
HEADLINE_METRICS: tuple[str, ...] = (
    "linear/top1", "knn/top1",
    "det/voc07_AP50", "det/voc07_AP", "det/voc07_AP75", "det/coco_AP", "det/coco_AP50", "det/coco_AP75",
    "scores/pos_mean", "scores/neg_mean",
)
#: the step headline metrics are logged at on a parent run: one step, so MLflow's latest value (the
#: largest step, then the newest timestamp) is the one logged last, whatever the stage's own steps
PARENT_STEP = 0
PARENT_RUN_TAG = "mlflow.parentRunId"
NOTE_TAG = "mlflow.note.content"


def parent_run_name(row: str, seed: int | str) -> str:
    return f"{row} · seed {seed}"


def row_params(cfg: Mapping, overrides: Mapping[str, Any] | None) -> dict[str, str] | None:
    """The params of a row run: each of the row's ``overrides`` (dotted run-config keys), valued as
    the run config has them (as :meth:`Tracker.log_params` writes values); None without
    ``overrides`` (then a run's params are left as they are)."""
    if overrides is None:
        return None
    from ftcl.config import flatten

    flat = flatten(cfg)
    wanted = flatten(overrides)  # a nested override ({"ft": {"positive": ...}}) counts key by key
    return {k: str(flat.get(k, v))[:6000] for k, v in wanted.items()}


def parent_params(cfg: Mapping, seed: int | str, overrides: Mapping[str, Any] | None) -> dict[str, str] | None:
    """The params of a row x seed parent run: ``seed`` and the row run's (:func:`row_params`)."""
    params = row_params(cfg, overrides)
    return None if params is None else {"seed": str(seed), **params}


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
    found = retry(client.search_runs, [experiment_id], filter_string=query, max_results=1000)
    runs = [r for r in found if TAG_SUPERSEDED not in r.data.tags]
    return sorted(runs, key=lambda r: (r.info.start_time or 0, r.info.run_id))


def current_row_runs(client, experiment_id: str, row: str) -> list:
    """The row runs of ``row`` that are not superseded, oldest first (ties: by run id)."""
    query = f"tags.`{TAG_ROW}` = '{row}' and tags.`{TAG_STAGE}` = '{ROW_STAGE}'"
    found = retry(client.search_runs, [experiment_id], filter_string=query, max_results=1000)
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
        retry(client.log_batch, run_id, params=fresh[i : i + 100])
    return bool(fresh)


def headline_of(metrics: Mapping[str, float]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if k in HEADLINE_METRICS and v == v}


def log_parent_metrics(client, parent_id: str, metrics: Mapping[str, float]) -> None:
    """Log ``metrics`` to a parent run at :data:`PARENT_STEP`, time now: they become its latest values."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    batch = [Metric(k, float(v), now, PARENT_STEP) for k, v in metrics.items()]
    if batch:
        retry(client.log_batch, parent_id, metrics=batch)


def row_run_description(row: str, experiment: str | None, lead: str | None = None) -> str:
    """The MLflow description (``mlflow.note.content``, Markdown) of a row run: the row and its
    experiment, the row's description (``tracking.tags.description``: its text and overrides), and
    what its metrics are."""
    lines = [f"**{row}**" + (f" · experiment `{experiment}`" if experiment else ""), ""]
    if lead:
        lines += [str(lead), ""]
    lines.append("One run per seed is nested below. Metrics (set by `ftcl aggregate`, the numbers of its "
                 "ablation table): `<metric>/mean`, `/std`, `/n` over seeds, and `/delta`, `/delta_low`, "
                 "`/delta_high`: the paired difference to the reference row with its 95 % interval.")
    return "\n".join(lines)[:5000]


def ensure_row_run(client, experiment_id: str, row: str, tags: Mapping[str, Any] = (),
                   params: Mapping[str, str] | None = None, supersede: bool = True) -> str:
    """The id of the row run of ``row`` (named ``row``, tagged ``ftcl.row`` and ``ftcl.stage: row``),
    created (with ``tags`` and ``params``) when there is none. An existing one gets the ``params`` it
    lacks; with ``supersede``, one whose params ``params`` would change is superseded (tagged
    ``ftcl.superseded``, renamed ``... (superseded)``, never deleted) and replaced by a new one: the
    seed parent runs created from then on nest under the new one.

    Stages starting at once may each create one: the oldest is kept, the others deleted."""
    kept, _, superseded = _get_or_create(
        client, experiment_id, lambda: current_row_runs(client, experiment_id, row), row,
        {TAG_ROW: str(row), TAG_STAGE: ROW_STAGE}, tags, params, supersede)
    if superseded is not None:  # ended unless a seed parent under it still runs (its stage ends it then)
        close_row_run(client, experiment_id, superseded.info.run_id)
    return kept


def _get_or_create(client, experiment_id: str, search, name: str, own_tags: Mapping[str, str],
                   tags: Mapping[str, Any], params: Mapping[str, str] | None,
                   supersede: bool = True) -> tuple[str, Any, Any]:
    """Get or create the one current run ``search()`` finds (oldest first): ``(id of the run kept,
    that run as read from the store or None when it is the one created here, the run superseded or
    None)``.

    A run found whose params ``params`` would change (MLflow cannot change a param) is superseded
    (``supersede``) and a new one created; several jobs creating one at once each keep the oldest
    and delete their own."""
    tags = {k: str(v) for k, v in dict(tags).items()}
    found = search()
    if found:
        current = found[0]
        stale = [] if params is None or not supersede else _stale_params(current, params)
        if not stale:
            if params is not None and _log_params(client, current.info.run_id, params, current.data.params) \
                    and NOTE_TAG in tags:  # new overrides: the description lists them too
                retry(client.set_tag, current.info.run_id, NOTE_TAG, tags[NOTE_TAG])
            return current.info.run_id, current, None
        _supersede_parent(client, current, f"row settings changed: {', '.join(stale)}")
    run = retry(client.create_run, experiment_id, run_name=name, tags={**own_tags, **tags})
    mine = run.info.run_id
    if params:
        _log_params(client, mine, params, {})
    now = search()  # another stage may have created one too
    kept = now[0].info.run_id if now else mine
    if kept != mine:
        retry(client.delete_run, mine)
        if params is not None:
            _log_params(client, kept, params, now[0].data.params)
    return kept, (now[0] if now and kept != mine else None), (found[0] if found else None)


def ensure_parent_run(client, experiment_id: str, row: str, seed: int | str, tags: Mapping[str, Any] = (),
                      params: Mapping[str, str] | None = None, stage: str | None = None,
                      row_tags: Mapping[str, Any] = ()) -> str:
    """The id of the parent run of ``row`` x ``seed``, created (with ``tags`` and ``params``) when
    there is none, nested under the row's current row run (:func:`ensure_row_run`, created with
    ``row_tags`` and ``params`` but ``seed`` when there is none). An existing parent gets the
    ``params`` it lacks, and moves under the current row run. One whose params ``params`` would
    change (MLflow cannot change a param) is superseded: tagged ``ftcl.superseded``, renamed
    ``... (superseded)``, and replaced by a new parent that takes along its stage runs that are not
    superseded (but ``stage``'s, which is starting a new run) and their headline metrics.

    Stages starting at once may each create one: the oldest is kept, the others deleted."""
    row_id = ensure_row_run(client, experiment_id, row, row_tags,
                            None if params is None else {k: v for k, v in params.items() if k != "seed"})
    kept, current, superseded = _get_or_create(
        client, experiment_id, lambda: _parents(client, experiment_id, row, seed), parent_run_name(row, seed),
        {TAG_ROW: str(row), TAG_SEED: str(seed), TAG_STAGE: PARENT_STAGE, PARENT_RUN_TAG: row_id}, tags, params)
    if current is not None and current.data.tags.get(PARENT_RUN_TAG) != row_id:
        retry(client.set_tag, kept, PARENT_RUN_TAG, row_id)  # a parent from before row runs, or a lost race
    if superseded is not None:  # the superseded parent's stage runs move to the one kept
        _adopt_children(client, experiment_id, superseded.info.run_id, kept, stage)
    return kept


def _supersede_parent(client, parent, reason: str) -> None:
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    retry(client.set_tag, parent.info.run_id, TAG_SUPERSEDED, stamp)
    retry(client.set_tag, parent.info.run_id, "ftcl.superseded_reason", reason[:5000])
    retry(client.update_run, parent.info.run_id, name=f"{parent.info.run_name} (superseded)")


def _adopt_children(client, experiment_id: str, old: str, new: str, stage: str | None) -> None:
    """Move the stage runs of parent ``old`` that are not superseded (but ``stage``'s) to parent
    ``new``, with their headline metrics; end ``old``."""
    children = retry(client.search_runs, [experiment_id], filter_string=f"tags.`{PARENT_RUN_TAG}` = '{old}'",
                      max_results=1000)
    headline: dict[str, float] = {}
    for child in sorted(children, key=lambda r: (r.info.start_time or 0, r.info.run_id)):  # newest run wins
        ctags = child.data.tags
        if TAG_SUPERSEDED in ctags or (stage is not None and ctags.get(TAG_STAGE) == stage):
            continue
        retry(client.set_tag, child.info.run_id, PARENT_RUN_TAG, new)
        headline.update(headline_of(child.data.metrics))
    log_parent_metrics(client, new, headline)
    left = retry(client.search_runs, [experiment_id], filter_string=f"tags.`{PARENT_RUN_TAG}` = '{old}'",
                  max_results=1000)
    states = {r.info.status for r in left}
    if "RUNNING" not in states and "SCHEDULED" not in states:
        retry(client.set_terminated, old, status=next((s for s in ("FAILED", "KILLED") if s in states), "FINISHED"))


def supersede_run(client, run_id: str, stamp: str, moved_to: str | Path | None = None) -> None:
    """Tag a stage run whose folder was moved aside ``ftcl.superseded`` (it stays in the store) and
    take back what it fed its parent run: each headline metric the parent still shows with this
    run's value is logged there as NaN (no current result) until the stage's new run logs one."""
    retry(client.set_tag, run_id, TAG_SUPERSEDED, stamp)
    if moved_to is not None:
        retry(client.set_tag, run_id, "ftcl.superseded_to", str(moved_to))
    run = retry(client.get_run, run_id)
    parent_id = run.data.tags.get(PARENT_RUN_TAG)
    if not parent_id:
        return
    parent = retry(client.get_run, parent_id)
    if parent.data.tags.get(TAG_STAGE) != PARENT_STAGE:
        return
    shown = parent.data.metrics
    fed = [k for k, v in headline_of(run.data.metrics).items() if k in shown and shown[k] == v]
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
    children = retry(client.search_runs, [experiment_id], filter_string=f"tags.`{PARENT_RUN_TAG}` = '{parent_id}'",
                      max_results=1000)
    states = {run.info.status for run in children}
    if not children or "RUNNING" in states or "SCHEDULED" in states:
        return
    status = next((s for s in ("FAILED", "KILLED") if s in states), "FINISHED")
    retry(client.set_terminated, parent_id, status=status)


def close_row_run(client, experiment_id: str, row_id: str) -> None:
    """End a row run once none of its seed parent runs is RUNNING, in the state of its current
    (not superseded) ones: FAILED when one failed, else KILLED when one was interrupted, else
    FINISHED. Each stage calls it after closing its parent run; so does ``ftcl aggregate``."""
    children = retry(client.search_runs, [experiment_id], filter_string=f"tags.`{PARENT_RUN_TAG}` = '{row_id}'",
                      max_results=1000)
    if {"RUNNING", "SCHEDULED"} & {run.info.status for run in children}:
        return
    states = {run.info.status for run in children if TAG_SUPERSEDED not in run.data.tags}
    status = next((s for s in ("FAILED", "KILLED") if s in states), "FINISHED")
    retry(client.set_terminated, row_id, status=status)


def row_run_of(client, parent_id: str) -> str | None:
    """The row run a parent run is nested under (None for a parent from before row runs)."""
    row_id = retry(client.get_run, parent_id).data.tags.get(PARENT_RUN_TAG)
    if row_id and retry(client.get_run, row_id).data.tags.get(TAG_STAGE) == ROW_STAGE:
        return row_id
    return None
