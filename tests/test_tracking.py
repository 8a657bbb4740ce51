"""Row runs and row x seed parent runs as the rows' comparison in MLflow: one top-level run per row
with the seed parents nested under it, the row's overrides as params, the latest headline result of
each stage as metrics, nothing from superseded stage runs; and experiments that say they are model
training (``mlflow.experimentKind``). Stages are stood in for by ``Tracker``s
that log what the real stages log (no training), on one sqlite store for the whole module."""

from __future__ import annotations

import json
import math
import os
import time

import pytest
from mlflow.entities import Param

from ftcl import config
from ftcl.constants import PARENT_STAGE, ROW_STAGE, TAG_ROW, TAG_SEED, TAG_STAGE, TAG_SUPERSEDED
from ftcl.tracking import (
    EXPERIMENT_KIND,
    EXPERIMENT_KIND_TAG,
    HEADLINE_METRICS,
    PARENT_RUN_TAG,
    Tracker,
    ensure_parent_run,
    get_or_create_experiment,
    supersede_run,
)

FT = {"ft.positive.mode": "extrapolate", "ft.negative.mode": "interpolate"}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One sqlite store (creating one costs seconds): each test uses its own experiment."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path_factory.mktemp('store') / 'mlflow.db'}"
    return uri, MlflowClient(uri)


def run_cfg(uri: str, experiment: str, overrides: dict, row: str = "+ft", seed: int = 0, tagged: bool = True):
    """A stage's run config as the pipeline resolves it: the row's overrides applied, and (``tagged``)
    passed again as JSON in ``tracking.tags.overrides``."""
    tags = {"tracking.tags.row": row, "tracking.tags.seed": seed, "tracking.tags.description": f"row {row}"}
    if tagged:
        tags["tracking.tags.overrides"] = json.dumps(overrides)
    return config.resolve(overrides={**overrides, **tags, "experiment": experiment, "seed": seed,
                                     "tracking.uri": uri})


def parents(client, experiment: str, superseded: bool = False) -> list:
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], f"tags.`{TAG_STAGE}` = '{PARENT_STAGE}'")
    return [r for r in runs if (TAG_SUPERSEDED in r.data.tags) == superseded]


def the_parent(client, experiment: str):
    (run,) = parents(client, experiment)
    return run


def row_runs(client, experiment: str, superseded: bool = False) -> list:
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], f"tags.`{TAG_STAGE}` = '{ROW_STAGE}'")
    return [r for r in runs if (TAG_SUPERSEDED in r.data.tags) == superseded]


def the_row_run(client, experiment: str):
    (run,) = row_runs(client, experiment)
    return run


def stage(cfg, folder, name: str, metrics: dict | None = None, step: int | None = None) -> Tracker:
    """A finished stage run that logged ``metrics`` (at ``step``, as the stage does)."""
    with Tracker(cfg, folder, name) as tracker:
        if metrics:
            tracker.log_metrics(metrics, step=step)
    return tracker


def test_the_parent_run_holds_the_row_overrides_as_params(store, tmp_path):
    uri, client = store
    cfg = run_cfg(uri, "params", FT, seed=3)
    pretrain = stage(cfg, tmp_path / "pretrain", "pretrain")
    parent = the_parent(client, "params")
    assert parent.info.run_name == "+ft · seed 3"
    assert parent.data.params == {"seed": "3", **FT}
    assert "overrides" not in parent.data.tags
    child_tags = client.get_run(pretrain.run_id).data.tags
    assert "overrides" not in child_tags and "description" not in child_tags  # texts for the parent, no tags
    assert child_tags[PARENT_RUN_TAG] == parent.info.run_id
    stage(cfg, tmp_path / "linear", "linear")  # a second stage: the same parent, the same params
    assert the_parent(client, "params").data.params == {"seed": "3", **FT}

    # the baseline row: no overrides, so only its seed; a run config without the tag: no params at all
    stage(run_cfg(uri, "params", {}, row="moco_v2", seed=3), tmp_path / "base", "pretrain")
    stage(run_cfg(uri, "params", FT, row="manual", seed=3, tagged=False), tmp_path / "manual", "pretrain")
    by_name = {p.info.run_name: p.data.params for p in parents(client, "params")}
    assert by_name["moco_v2 · seed 3"] == {"seed": "3"} and by_name["manual · seed 3"] == {}


def test_values_come_from_the_run_config_and_a_bad_overrides_tag_fails_early(store, tmp_path):
    uri, client = store
    nested = {"augment": {"crop_scale": [0.5, 1.0]}, "optim.epochs": 3}
    stage(run_cfg(uri, "values", nested), tmp_path / "pretrain", "pretrain")
    assert the_parent(client, "values").data.params == {"seed": "0", "augment.crop_scale": "[0.5, 1.0]",
                                                        "optim.epochs": "3"}
    cfg = run_cfg(uri, "values", FT)
    cfg = config.replace(cfg, {"tracking.tags.overrides": "{not json"})
    with pytest.raises(Exception, match="tracking.tags.overrides"):
        Tracker(cfg, tmp_path / "bad", "pretrain")


def test_the_parent_run_shows_the_latest_headline_result_of_each_stage(store, tmp_path):
    uri, client = store
    cfg = run_cfg(uri, "headline", FT)
    with Tracker(cfg, tmp_path / "pretrain", "pretrain") as pretrain:  # per epoch, as train.py logs
        for epoch, (pos, neg) in enumerate([(0.5, 0.1), (0.7, 0.05)], start=1):
            pretrain.log_metrics({"pretrain/loss": 5.0 - epoch, "scores/pos_mean": pos, "scores/neg_mean": neg,
                                  "scores/neg_var": 0.01}, step=epoch)
    stage(cfg, tmp_path / "linear", "linear", {"linear/top1": 41.0, "linear/top5": 80.0}, step=2)
    stage(cfg, tmp_path / "knn", "knn", {"knn/top1": 38.5}, step=2)
    stage(cfg, tmp_path / "detection", "detection",
          {"det/voc07_AP50": 60.1, "det/voc07_AP": 40.2, "det/voc07_AP75": 41.3})
    metrics = the_parent(client, "headline").data.metrics
    assert metrics == {"scores/pos_mean": 0.7, "scores/neg_mean": 0.05, "linear/top1": 41.0, "knn/top1": 38.5,
                       "det/voc07_AP50": 60.1, "det/voc07_AP": 40.2, "det/voc07_AP75": 41.3}
    assert set(metrics) <= set(HEADLINE_METRICS)

    # a rerun of linear in a new folder, after a shorter pretraining (a smaller step): its value wins
    stage(cfg, tmp_path / "linear-2", "linear", {"linear/top1": 39.0}, step=1)
    parent = the_parent(client, "headline")
    assert parent.data.metrics["linear/top1"] == 39.0
    history = client.get_metric_history(parent.info.run_id, "linear/top1")
    assert [m.value for m in sorted(history, key=lambda m: m.timestamp)] == [41.0, 39.0]
    assert parent.info.status == "FINISHED"


def test_superseded_stage_runs_do_not_feed_the_parent(store, tmp_path):
    uri, client = store
    cfg = run_cfg(uri, "superseded", FT)
    stage(cfg, tmp_path / "knn", "knn", {"knn/top1": 38.5}, step=2)
    old = stage(cfg, tmp_path / "linear", "linear", {"linear/top1": 41.0}, step=2)
    parent_id = the_parent(client, "superseded").info.run_id

    # its folder is moved aside: the parent no longer shows its value (NaN: no current result)
    supersede_run(client, old.run_id, "20260101T000000Z", tmp_path / "_superseded" / "linear")
    tags = client.get_run(old.run_id).data.tags
    assert tags[TAG_SUPERSEDED] == "20260101T000000Z" and tags["ftcl.superseded_to"].endswith("linear")
    metrics = client.get_run(parent_id).data.metrics
    assert math.isnan(metrics["linear/top1"]) and metrics["knn/top1"] == 38.5

    # the old job, still logging (a late requeue): nothing reaches the parent
    with Tracker(cfg, tmp_path / "linear", "linear") as late:
        assert late.run_id == old.run_id
        late.log_metrics({"linear/top1": 99.0}, step=3)
    assert math.isnan(client.get_run(parent_id).data.metrics["linear/top1"])
    assert client.get_run(old.run_id).data.metrics["linear/top1"] == 99.0  # its own run keeps it

    # the stage's new run: the parent shows its value
    stage(cfg, tmp_path / "linear-new", "linear", {"linear/top1": 42.0}, step=2)
    assert client.get_run(parent_id).data.metrics["linear/top1"] == 42.0
    # a run superseded after a newer value reached the parent takes nothing back
    supersede_run(client, late.run_id, "20260101T000001Z")
    assert client.get_run(parent_id).data.metrics["linear/top1"] == 42.0


def test_changed_row_overrides_replace_the_parent_and_move_its_current_stage_runs(store, tmp_path):
    """MLflow cannot change a param: a parent whose params the row's settings change is superseded
    and a new one takes its stage runs that still hold (and their headline results)."""
    uri, client = store
    cfg = run_cfg(uri, "changed", FT)
    pretrain = stage(cfg, tmp_path / "pretrain", "pretrain", {"scores/pos_mean": 0.7}, step=2)
    knn = stage(cfg, tmp_path / "knn", "knn", {"knn/top1": 38.5}, step=2)
    linear = stage(cfg, tmp_path / "linear", "linear", {"linear/top1": 41.0}, step=2)
    old = the_parent(client, "changed")

    # a key added to the row (it reran nothing here): the same parent gets the new param
    more = {**FT, "eval.knn.k": 20}
    stage(run_cfg(uri, "changed", more), tmp_path / "knn-2", "knn", {"knn/top1": 39.0}, step=2)
    assert the_parent(client, "changed").info.run_id == old.info.run_id
    assert the_parent(client, "changed").data.params["eval.knn.k"] == "20"

    # a value changed: linear reran (its old run superseded); pretrain and knn still hold
    changed = {**more, "ft.negative.mode": "none", "eval.linear.lr": 0.5}
    supersede_run(client, linear.run_id, "20260101T000000Z")
    new_linear = stage(run_cfg(uri, "changed", changed), tmp_path / "linear-2", "linear", {"linear/top1": 43.0},
                       step=2)
    new = the_parent(client, "changed")
    assert new.info.run_id != old.info.run_id
    (gone,) = parents(client, "changed", superseded=True)
    assert gone.info.run_id == old.info.run_id and gone.info.run_name == "+ft · seed 0 (superseded)"
    assert "ft.negative.mode ('interpolate' -> 'none')" in gone.data.tags["ftcl.superseded_reason"]
    assert gone.info.status == "FINISHED"
    assert new.info.run_name == "+ft · seed 0" and new.data.params["ft.negative.mode"] == "none"
    assert new.data.params["eval.linear.lr"] == "0.5"
    note = new.data.tags["mlflow.note.content"]  # the description as the row is now (`none`: the default)
    assert "- `eval.linear.lr`: `0.5`" in note and "ft.negative.mode" not in note
    assert new.data.tags[TAG_ROW] == "+ft" and new.data.tags[TAG_SEED] == "0"
    under = {t.run_id: client.get_run(t.run_id).data.tags[PARENT_RUN_TAG] for t in (pretrain, knn, new_linear, linear)}
    assert under == {pretrain.run_id: new.info.run_id, knn.run_id: new.info.run_id,
                     new_linear.run_id: new.info.run_id, linear.run_id: old.info.run_id}
    assert new.data.metrics == {"scores/pos_mean": 0.7, "knn/top1": 39.0, "linear/top1": 43.0}


def test_parents_created_at_once_end_as_one(store, tmp_path):
    """Two stages that find no parent both create one: the older is kept, the other deleted."""
    uri, client = store
    exp_id = get_or_create_experiment(client, "race", None)
    rival: list[str] = []
    real_create = client.create_run

    def create_run(experiment_id, **kwargs):  # another stage creates its parent just before this one
        if not rival and kwargs.get("tags", {}).get(TAG_STAGE) == PARENT_STAGE:
            rival.append(real_create(experiment_id, **kwargs).info.run_id)
            time.sleep(0.01)  # a millisecond clock: the rival is the older one
        return real_create(experiment_id, **kwargs)

    client.create_run = create_run
    try:
        kept = ensure_parent_run(client, exp_id, "+ft", 0, {}, params={"seed": "0", **FT})
    finally:
        del client.create_run
    assert kept == rival[0]
    (parent,) = parents(client, "race")  # the newer one is deleted
    assert parent.info.run_id == kept and parent.data.params == {"seed": "0", **FT}
    assert len(client.search_runs([exp_id])) == 2  # the parent and its row run


def test_seed_parents_nest_under_one_row_run_holding_the_row_overrides(store, tmp_path):
    """The runs table's top level: one run per row, named after it, its description the row's and its
    params the row's overrides; every seed's parent run nested under it, the stage runs under those."""
    uri, client = store
    for seed in (0, 1):
        cfg = run_cfg(uri, "rows", FT, seed=seed)
        stage(cfg, tmp_path / f"seed{seed}" / "pretrain", "pretrain")
        stage(cfg, tmp_path / f"seed{seed}" / "linear", "linear", {"linear/top1": 40.0 + seed}, step=2)
    stage(run_cfg(uri, "rows", {}, row="moco_v2"), tmp_path / "base", "pretrain")
    rows = {r.data.tags[TAG_ROW]: r for r in row_runs(client, "rows")}
    assert set(rows) == {"+ft", "moco_v2"}
    ft = rows["+ft"]
    assert ft.info.run_name == "+ft" and ft.data.tags[TAG_STAGE] == ROW_STAGE == "row"
    assert PARENT_RUN_TAG not in ft.data.tags and TAG_SEED not in ft.data.tags  # top level, no seed
    assert ft.data.params == FT and rows["moco_v2"].data.params == {}
    assert "row +ft" in ft.data.tags["mlflow.note.content"]  # the row's description
    assert ft.info.status == "FINISHED"  # no stage of the row runs any more
    by_seed = {p.data.tags[TAG_SEED]: p for p in parents(client, "rows") if p.data.tags[TAG_ROW] == "+ft"}
    assert {s: p.data.tags[PARENT_RUN_TAG] for s, p in by_seed.items()} == {"0": ft.info.run_id, "1": ft.info.run_id}
    (base,) = [p for p in parents(client, "rows") if p.data.tags[TAG_ROW] == "moco_v2"]
    assert base.data.tags[PARENT_RUN_TAG] == rows["moco_v2"].info.run_id

    # while a stage of the row runs, its row run shows RUNNING too
    running = Tracker(run_cfg(uri, "rows", FT, seed=1), tmp_path / "seed1" / "knn", "knn")
    assert the_row_run_of(client, "rows", "+ft").info.status == "RUNNING"
    running.finish()
    assert the_row_run_of(client, "rows", "+ft").info.status == "FINISHED"


def the_row_run_of(client, experiment: str, row: str):
    (run,) = [r for r in row_runs(client, experiment) if r.data.tags[TAG_ROW] == row]
    return run


def test_changed_overrides_supersede_the_row_run_and_new_seed_parents_nest_under_the_new_one(store, tmp_path):
    uri, client = store
    for seed in (0, 1):
        stage(run_cfg(uri, "row-changed", FT, seed=seed), tmp_path / f"seed{seed}" / "pretrain", "pretrain")
    old = the_row_run(client, "row-changed")

    # a key added to the row: the same row run gets the new param
    more = {**FT, "eval.knn.k": 20}
    stage(run_cfg(uri, "row-changed", more, seed=0), tmp_path / "seed0" / "knn", "knn")
    assert the_row_run(client, "row-changed").info.run_id == old.info.run_id
    assert the_row_run(client, "row-changed").data.params == {**FT, "eval.knn.k": "20"}

    # a value changed: the row run is superseded (kept, renamed) and a new one takes the new seed parents
    changed = {**more, "ft.negative.mode": "none"}
    stage(run_cfg(uri, "row-changed", changed, seed=0), tmp_path / "seed0" / "pretrain-2", "pretrain")
    new = the_row_run(client, "row-changed")
    (gone,) = row_runs(client, "row-changed", superseded=True)
    assert gone.info.run_id == old.info.run_id and gone.info.run_name == "+ft (superseded)"
    assert "ft.negative.mode ('interpolate' -> 'none')" in gone.data.tags["ftcl.superseded_reason"]
    assert new.info.run_id != old.info.run_id and new.info.run_name == "+ft"
    assert new.data.params == {**FT, "eval.knn.k": "20", "ft.negative.mode": "none"}
    under = {(p.data.tags[TAG_SEED], TAG_SUPERSEDED in p.data.tags): p.data.tags[PARENT_RUN_TAG]
             for p in [*parents(client, "row-changed"), *parents(client, "row-changed", superseded=True)]}
    # seed 1 has not run under the new settings yet: its parent stays with the old row run
    assert under == {("0", False): new.info.run_id, ("0", True): old.info.run_id, ("1", False): old.info.run_id}

    # seed 1's stage under the new settings: its new parent nests under the new row run, no third row run
    stage(run_cfg(uri, "row-changed", changed, seed=1), tmp_path / "seed1" / "pretrain-2", "pretrain")
    assert the_row_run(client, "row-changed").info.run_id == new.info.run_id
    current = {p.data.tags[TAG_SEED]: p.data.tags[PARENT_RUN_TAG] for p in parents(client, "row-changed")}
    assert current == {"0": new.info.run_id, "1": new.info.run_id}
    assert len(row_runs(client, "row-changed", superseded=True)) == 1
    assert client.get_run(old.info.run_id).info.lifecycle_stage == "active"  # never deleted


def test_row_runs_created_at_once_end_as_one(store):
    """Two stages (seeds) of a row that find no row run both create one: the older is kept, the
    newer deleted, and both seed parents nest under the one kept."""
    uri, client = store
    exp_id = get_or_create_experiment(client, "row-race", None)
    rival: list[str] = []
    real_create = client.create_run

    def create_run(experiment_id, **kwargs):  # another seed's stage creates the row run just before
        if not rival and kwargs.get("tags", {}).get(TAG_STAGE) == ROW_STAGE:
            rival.append(real_create(experiment_id, **kwargs).info.run_id)
            time.sleep(0.01)  # a millisecond clock: the rival is the older one
        return real_create(experiment_id, **kwargs)

    client.create_run = create_run
    try:
        first = ensure_parent_run(client, exp_id, "+ft", 0, {}, params={"seed": "0", **FT})
    finally:
        del client.create_run
    second = ensure_parent_run(client, exp_id, "+ft", 1, {}, params={"seed": "1", **FT})
    (row,) = row_runs(client, "row-race")  # the newer one is deleted
    assert row.info.run_id == rival[0] and row.data.params == FT
    assert {client.get_run(p).data.tags[PARENT_RUN_TAG] for p in (first, second)} == {row.info.run_id}


def test_a_seed_parent_from_before_row_runs_nests_under_the_row_run(store, tmp_path):
    """A store written before row runs existed: the first stage of the row that starts now gives the
    row its row run and moves the seed parent, kept as it is, under it."""
    uri, client = store
    exp_id = get_or_create_experiment(client, "old-store", None)
    old = client.create_run(exp_id, run_name="+ft · seed 0", tags={TAG_ROW: "+ft", TAG_SEED: "0",
                                                                   TAG_STAGE: PARENT_STAGE})
    client.log_batch(old.info.run_id, params=[Param(k, v) for k, v in {"seed": "0", **FT}.items()])
    stage(run_cfg(uri, "old-store", FT), tmp_path / "knn", "knn", {"knn/top1": 38.5})
    assert the_parent(client, "old-store").info.run_id == old.info.run_id
    assert client.get_run(old.info.run_id).data.tags[PARENT_RUN_TAG] == the_row_run(client, "old-store").info.run_id


def test_experiments_say_they_are_model_training(store):
    """MLflow 3 reads ``mlflow.experimentKind``: ftcl sets ``custom_model_development`` on an
    experiment it creates and on an existing one without a kind; a kind already chosen is kept."""
    _, client = store
    exp_id = get_or_create_experiment(client, "kind-new", None)
    assert client.get_experiment(exp_id).tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND == "custom_model_development"
    old = client.create_experiment("kind-old")
    assert EXPERIMENT_KIND_TAG not in client.get_experiment(old).tags
    assert get_or_create_experiment(client, "kind-old", None) == old
    assert client.get_experiment(old).tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND
    chosen = client.create_experiment("kind-chosen", tags={EXPERIMENT_KIND_TAG: "genai_development"})
    get_or_create_experiment(client, "kind-chosen", None)
    assert client.get_experiment(chosen).tags[EXPERIMENT_KIND_TAG] == "genai_development"


def test_opening_a_store_leaves_the_environment_alone(tmp_path, monkeypatch):
    """A pipeline started after a store was opened in the same process follows $MLFLOW_TRACKING_URI
    where the pipeline config sets no uri; opening a store must not set it."""
    from ftcl.tracking.store import open_client

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    open_client(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert "MLFLOW_TRACKING_URI" not in os.environ


def test_aggregation_logs_to_the_store_the_pipeline_gave_its_stages(tmp_path, monkeypatch):
    from ftcl import pipeline
    from ftcl.results.command import pipeline_tracking_uri

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'elsewhere.db'}")
    pipe = pipeline.load({"experiment": "e", "results_dir": str(tmp_path / "results"),
                          "ablations": [{"name": "a", "baseline": True}]}, resolve_runs=False)
    assert pipeline_tracking_uri(pipe) == f"sqlite:///{(tmp_path / 'results' / 'mlflow.db').resolve()}"
