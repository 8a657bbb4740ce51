"""The pipeline's logic without Snakemake (ftcl/pipeline/, ftcl/orchestrate/folders.py): every run-config key
belongs to the stages that read it, digests follow those stages only, rows and grids are checked,
no folder escapes the results folder, and a stage's earlier work is kept, resumed or moved aside."""

from __future__ import annotations

import copy
import json
import re
import tomllib
from pathlib import Path

import pytest
import yaml

from ftcl import config as runconfig
from ftcl import pipeline
from ftcl.constants import STAGES
from ftcl.errors import ConfigError
from ftcl.orchestrate import folders

REPO = Path(__file__).resolve().parents[1]
TINY = yaml.safe_load((REPO / "config" / "tiny.yaml").read_text())


def tiny(**changes) -> dict:
    cfg = copy.deepcopy(TINY)
    cfg.update(changes)
    return cfg


def test_every_run_config_key_belongs_to_the_stages_that_read_it():
    keys = runconfig.flatten(runconfig.defaults())
    missing = []
    for key in keys:
        try:
            stages = runconfig.stages_of(key)
        except KeyError:
            missing.append(key)
            continue
        assert set(stages) <= set(STAGES), key
    assert not missing, f"run-config keys without `x-stages` in config.schema.yaml: {missing}"
    schema = runconfig.schema()
    assert all("x-stages" in node for node in schema["properties"].values()), "every top-level key declares x-stages"
    assert runconfig.stages_of("optim.lr_per_256") == ("pretrain",)
    assert runconfig.stages_of("eval.knn.k") == ("knn",)
    assert runconfig.stages_of("detection.iterations") == ("detection",)
    assert runconfig.stages_of("tracking.uri") == () and runconfig.stages_of("log_every") == ()
    assert set(runconfig.stages_of("seed")) == set(STAGES)


@pytest.mark.parametrize(("key", "value", "changed"), [
    ("eval.knn.k", 7, {"knn"}),
    ("eval.linear.epochs", 9, {"linear"}),
    ("detection.iterations", 11, {"detection"}),
    ("ft.positive.mode", "extrapolate", {"pretrain"}),
    ("optim.lr_per_256", 0.5, {"pretrain"}),
    ("data.train_subset", 100, set(STAGES)),
    ("tracking.uri", "sqlite:///elsewhere.db", set()),
    ("log_every", 3, set()),
    ("optim.compile", True, set()),
    ("data.num_workers", 5, set()),
])
def test_a_key_changes_only_the_digests_of_the_stages_that_read_it(key, value, changed):
    base = runconfig.resolve(overrides={"data.dataset": "digits"})
    edited = runconfig.resolve(overrides={key: value}, base=runconfig.to_dict(base))
    moved = {s for s in STAGES if pipeline.stage_digest(base, s) != pipeline.stage_digest(edited, s)}
    assert moved == changed


def test_a_key_added_at_its_default_changes_no_digest():
    cfg = runconfig.resolve(overrides={"data.dataset": "digits", "eval.knn.k": 50})
    without = runconfig.to_dict(cfg)
    del without["data"]["decode"]  # as a run config written before the key existed
    assert all(pipeline.stage_digest(cfg, s) == pipeline.stage_digest(without, s) for s in STAGES)
    at_default = runconfig.replace(cfg, {"eval.knn.k": 200})  # back to the default: a change
    assert pipeline.stage_digest(at_default, "knn") != pipeline.stage_digest(cfg, "knn")


def test_rows_of_the_tiny_pipeline_resolve_with_row_and_seed():
    pipe = pipeline.load(tiny(), check_paths=False)
    assert pipe.row_names == ["moco_v2", "+ft"] and pipe.baseline == "moco_v2"
    cfg = pipe.run_config("+ft", 3)
    tags = cfg.tracking.tags
    assert cfg.seed == 3 and (tags["row"], tags["seed"]) == ("+ft", 3) and "row overrides:" in tags["description"]
    assert json.loads(tags["overrides"]) == {"ft.negative.mode": "interpolate", "ft.positive.mode": "extrapolate"}
    assert cfg.ft.positive.mode == "extrapolate"
    assert pipe.references == {"+ft": "moco_v2"}


def test_a_grid_expands_to_named_rows_each_validated():
    cfg = tiny()
    cfg["ablations"].append({"name": "+ft", "overrides": {"ft.negative.mode": "interpolate"},
                             "grid": {"ft.positive.alpha": [1.0, 2.5], "ft.start_epoch": [0, 3]}})
    cfg["ablations"][1]["name"] = "+ft_plain"
    pipe = pipeline.load(cfg, check_paths=False)
    grid_rows = [r for r in pipe.rows if r.group == "+ft"]
    assert [r.name for r in grid_rows] == ["+ft[alpha=1,start_epoch=0]", "+ft[alpha=1,start_epoch=3]",
                                          "+ft[alpha=2.5,start_epoch=0]", "+ft[alpha=2.5,start_epoch=3]"]
    assert pipe.run_config("+ft[alpha=2.5,start_epoch=3]", 0).ft.positive.alpha == 2.5
    assert pipe.run_config("+ft[alpha=2.5,start_epoch=3]", 0).ft.start_epoch == 3
    assert all(r.overrides["ft.negative.mode"] == "interpolate" for r in grid_rows)
    assert pipeline.grid_labels(["ft.positive.alpha", "ft.negative.alpha"]) == {
        "ft.positive.alpha": "positive.alpha", "ft.negative.alpha": "negative.alpha"}


@pytest.mark.parametrize(("grid", "message"), [
    ({"ft.positive.alpah": [1.0]}, r"unknown key 'ft.positive.alpah'"),
    ({"ft.positive.alpha": [-1.0]}, r"'ft.positive.alpha'"),
    ({"ft.positive.alpha": []}, r"grid"),
    ({"ft.positive.alpha": [1.0, 1.0]}, r"repeats a value"),
])
def test_a_bad_grid_is_rejected_naming_the_row_and_key(grid, message):
    cfg = tiny()
    cfg["ablations"].append({"name": "+g", "grid": grid})
    with pytest.raises(ConfigError, match=message):
        pipeline.load(cfg, check_paths=False)


def test_exactly_one_baseline_is_enforced_in_one_place():
    cfg = tiny()
    cfg["ablations"][1]["baseline"] = True
    with pytest.raises(ConfigError, match=r"exactly one ablation row must have `baseline: true`; found 2"):
        pipeline.load(cfg, check_paths=False)
    cfg["ablations"][0]["baseline"] = cfg["ablations"][1]["baseline"] = False
    with pytest.raises(ConfigError, match=r"found 0"):
        pipeline.load(cfg, resolve_runs=False)


@pytest.mark.parametrize("experiment", ["..", ".", ".hidden", "../../etc"])
def test_an_experiment_folder_outside_the_results_folder_is_rejected(experiment):
    with pytest.raises(ConfigError, match=r"experiment"):
        pipeline.load(tiny(experiment=experiment), check_paths=False)


@pytest.mark.parametrize("name", ["..", ".x", "tables", "a/b"])
def test_a_row_name_that_is_not_a_plain_folder_is_rejected(name):
    cfg = tiny()
    cfg["ablations"][1]["name"] = name
    with pytest.raises(ConfigError):
        pipeline.load(cfg, check_paths=False)


def test_the_detection_root_must_exist_when_detection_is_requested(tmp_path):
    cfg = tiny(stages=["pretrain", "linear", "knn", "detection"])
    cfg["defaults"]["detection"] = {"dataset": "voc", "root": str(tmp_path / "nowhere")}
    with pytest.raises(ConfigError, match=r"ablation row 'moco_v2': key 'detection.root' .* does not exist"):
        pipeline.load(cfg)
    cfg["stages"] = ["pretrain", "linear"]
    pipeline.load(cfg)  # not requested: not checked


def test_the_conda_environment_installs_what_pyproject_requires():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    env = yaml.safe_load((REPO / "workflow" / "envs" / "ftcl.yaml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d)

    def name(req: str) -> str:
        return re.split(r"[<>=!~\[ ]", req, maxsplit=1)[0].lower()

    assert {name(r): r.replace(" ", "") for r in pip} == {name(r): r.replace(" ", "") for r in project}


def test_the_stage_lists_of_the_pipeline_schema_are_the_stages():
    sch = pipeline.schema()
    assert sch["properties"]["stages"]["items"]["enum"] == list(STAGES)
    assert sch["properties"]["launcher"]["properties"]["stages"]["propertyNames"]["enum"] == list(STAGES)


# ------------------------------------------------------------------------------------ run folders
def _finished(run_dir: Path, stage: str, cfg: dict) -> folders.Prepared:
    prepared = folders.prepare(run_dir, stage, cfg)
    (prepared.folder / "config.yaml").write_text(yaml.safe_dump(runconfig.to_dict(cfg)))
    (prepared.folder / "checkpoints").mkdir(exist_ok=True)
    (prepared.folder / "checkpoints" / "last.pt").write_bytes(b"weights")
    (prepared.folder / f"{stage}.json").write_text(json.dumps({"top1": 50.0}))
    folders.finish(run_dir, stage, prepared)
    return prepared


def test_a_stage_with_the_same_settings_is_done_or_resumed_never_moved(tmp_path):
    cfg = runconfig.resolve(overrides={"data.dataset": "digits"})
    first = _finished(tmp_path, "pretrain", cfg)
    again = folders.prepare(tmp_path, "pretrain", runconfig.replace(cfg, {"log_every": 3}))
    assert again.state == "done" and again.key["id"] == json.loads((tmp_path / "pretrain.done").read_text())["id"]
    assert again.key["id"] == first.key["id"] or first.key["id"] == ""
    (tmp_path / "pretrain" / "pretrain.json").unlink()  # interrupted before the end: resume
    assert folders.prepare(tmp_path, "pretrain", cfg).state == "resume"
    assert not (tmp_path / folders.SUPERSEDED_DIR).exists()


def test_changed_settings_move_the_finished_folder_aside_intact(tmp_path):
    cfg = runconfig.resolve(overrides={"data.dataset": "digits"})
    _finished(tmp_path, "pretrain", cfg)
    _finished(tmp_path, "linear", cfg)
    edited = runconfig.replace(cfg, {"optim.lr_per_256": 0.5})
    moved = folders.prepare(tmp_path, "pretrain", edited)
    assert moved.state == "superseded" and "optim.lr_per_256 (0.03 -> 0.5)" in moved.reason
    assert (moved.moved_to / "checkpoints" / "last.pt").read_bytes() == b"weights"
    assert json.loads((moved.moved_to / "pretrain.json").read_text()) == {"top1": 50.0}
    assert moved.moved_to.parent == tmp_path / folders.SUPERSEDED_DIR
    assert not any((tmp_path / "pretrain").glob("*.json")) or (tmp_path / "pretrain" / ".ftcl_stage.json").exists()
    # the linear probe read the old pretraining: once the new one is done, it is moved aside too
    (tmp_path / "pretrain" / "pretrain.json").write_text("{}")
    folders.finish(tmp_path, "pretrain", moved)
    linear = folders.prepare(tmp_path, "linear", edited)
    assert linear.state == "superseded" and "pretraining it read was superseded" in linear.reason
    assert (linear.moved_to / "linear.json").is_file()


def test_a_folder_from_before_key_files_is_adopted_when_its_config_matches(tmp_path):
    cfg = runconfig.resolve(overrides={"data.dataset": "digits"})
    folder = tmp_path / "knn"
    folder.mkdir()
    (folder / "config.yaml").write_text(yaml.safe_dump(runconfig.to_dict(cfg)))
    (folder / "knn.json").write_text("{}")
    assert folders.prepare(tmp_path, "knn", cfg).state == "done"
    other = runconfig.replace(cfg, {"eval.knn.k": 5})
    assert folders.prepare(tmp_path, "knn", other).state == "superseded"


def test_a_pretraining_rerun_with_the_same_weights_leaves_its_readers_done(tmp_path):
    """Turning the kNN monitor on reruns pretraining (its folder is moved aside) but, where the
    weights come out the same, not the stages that read them; other weights rerun them."""
    cfg = runconfig.resolve(overrides={"data.dataset": "digits"})
    weights = {"backbone_sha256": "ab" * 32}

    def pretrain_with(run_cfg, result):
        prepared = folders.prepare(tmp_path, "pretrain", run_cfg)
        (prepared.folder / "pretrain.json").write_text(json.dumps(result))
        folders.finish(tmp_path, "pretrain", prepared)
        return prepared

    pretrain_with(cfg, weights)
    _finished(tmp_path, "linear", cfg)
    monitored = runconfig.replace(cfg, {"eval.monitor.every": 1})
    assert pretrain_with(monitored, weights).state == "superseded"
    assert folders.prepare(tmp_path, "linear", monitored).state == "done"
    assert pretrain_with(runconfig.replace(cfg, {"optim.lr_per_256": 0.5}), {"backbone_sha256": "cd" * 32}).state \
        == "superseded"
    assert folders.prepare(tmp_path, "linear", monitored).state == "superseded"


def test_the_weights_digest_tells_weights_apart():
    import torch

    from ftcl.checkpoint import weights_digest

    a = {"w": torch.ones(2, 2), "n": torch.tensor(3)}
    assert weights_digest(a) == weights_digest({k: v.clone() for k, v in a.items()})
    assert weights_digest(a) != weights_digest({**a, "w": torch.ones(2, 2).double()})
    assert weights_digest(a) != weights_digest({**a, "n": torch.tensor(4)})
