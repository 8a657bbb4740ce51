"""The Snakemake pipeline: the whole DAG on config/tiny.yaml through the local launcher, tracked in
MLflow; a bad config stopped before any job; an edited or added row rerunning only itself; every
shipped config planning its rows; `snakemake --lint` clean."""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import yaml

#: every test here starts Snakemake (a DAG run, a dry run or the linter): the slow tier
pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
TINY = yaml.safe_load((REPO / "config" / "tiny.yaml").read_text())
#: ablation.csv writes its numbers with float_format="%.4f" (ftcl/results/render.py): half the last digit,
#: plus a few ulps for reading them back
CSV_HALF_DIGIT = 0.5e-4 + 1e-9


def snakemake(workdir: Path, configfile: Path | None, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run Snakemake on the repository's Snakefile with ``workdir`` as its working directory."""
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    cmd = [str(BIN / "snakemake"), "-s", str(REPO / "Snakefile"), "-d", str(workdir)]
    if configfile is not None:
        cmd += ["--configfile", str(configfile)]
    return subprocess.run([*cmd, *args], capture_output=True, text=True, env=env, timeout=timeout)


def write_config(folder: Path, cfg: dict, name: str = "config.yaml") -> Path:
    cfg = copy.deepcopy(cfg)
    cfg["results_dir"] = str(folder / "results")
    path = folder / name
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def planned_jobs(proc: subprocess.CompletedProcess) -> list[tuple[str, str | None]]:
    """(rule, row) of every job a dry run plans."""
    assert proc.returncode == 0, proc.stderr + proc.stdout
    jobs, text = [], proc.stdout + proc.stderr
    for block in re.split(r"\n(?=(?:local)?rule \w+:)", text):
        rule = re.match(r"(?:local)?rule (\w+):", block)
        if rule:
            row = re.search(r"wildcards: row=(\S+), seed=\d+", block)
            jobs.append((rule[1], row[1] if row else None))
    return jobs


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """config/tiny.yaml run end to end once with `snakemake -c2` (results and MLflow under tmp)."""
    work = tmp_path_factory.mktemp("tiny")
    config = write_config(work, TINY)
    proc = snakemake(work, config, "-c2")
    return SimpleNamespace(work=work, config=config, proc=proc,
                           exp_dir=work / "results" / TINY["experiment"])


# No wall-clock limit: the tiny DAG's time is measured by benchmarks/orchestration.py, not asserted by the suite.
def test_the_tiny_dag_runs_end_to_end_into_the_ablation_table(tiny_run):
    assert tiny_run.proc.returncode == 0, tiny_run.proc.stderr[-5000:]
    table = pd.read_csv(tiny_run.exp_dir / "tables" / "ablation.csv")
    assert table["row"].tolist() == ["moco_v2", "+ft"]
    for metric in ("linear_top1", "knn_top1"):
        assert {f"{metric}_mean", f"{metric}_std", f"{metric}_delta"} <= set(table.columns)
        assert table[f"{metric}_mean"].between(0, 100).all()
    assert table["n_seeds"].tolist() == [1, 1]
    by_row = table.set_index("row")
    # the baseline is the reference: no delta of its own; +ft's delta refers to it (one seed: no interval)
    assert pd.isna(by_row.loc["moco_v2", "reference"]) and pd.isna(by_row.loc["moco_v2", "linear_top1_delta"])
    assert by_row.loc["+ft", "reference"] == "moco_v2"
    # The CSV rounds each number on its own (%.4f), so the rounded delta need not equal the difference of
    # the rounded means (-6.6667 vs -6.6666): compare each with the unrounded top-1 of the run folders.
    top1 = {row: json.loads((tiny_run.exp_dir / row / "seed0" / "linear" / "linear.json").read_text())["top1"]
            for row in ("moco_v2", "+ft")}
    for row in ("moco_v2", "+ft"):
        assert abs(by_row.loc[row, "linear_top1_mean"] - top1[row]) <= CSV_HALF_DIGIT, row
    assert abs(by_row.loc["+ft", "linear_top1_delta"] - (top1["+ft"] - top1["moco_v2"])) <= CSV_HALF_DIGIT
    assert "protocol" in table.columns
    for ext in ("md", "tex"):
        assert "+ft" in (tiny_run.exp_dir / "tables" / f"ablation.{ext}").read_text()
    for row in ("moco_v2", "+ft"):
        for stage in TINY["stages"]:
            run_config = yaml.safe_load((tiny_run.exp_dir / row / "seed0" / "configs" / f"{stage}.yaml").read_text())
            tags = run_config["tracking"]["tags"]
            assert run_config["seed"] == 0 and tags["row"] == row and tags["seed"] == 0
            assert "row overrides:" in tags["description"]
            assert (tiny_run.exp_dir / row / "seed0" / f"{stage}.done").is_file()
    assert yaml.safe_load((tiny_run.exp_dir / "+ft" / "seed0" / "pretrain" / "config.yaml").read_text())["ft"][
        "positive"]["mode"] == "extrapolate"


def test_mlflow_holds_each_row_and_stage_with_metrics_and_score_distributions(tiny_run):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tiny_run.work / 'results' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(TINY["experiment"])
    runs = client.search_runs([experiment.experiment_id])
    by_key: dict[tuple[str | None, str | None], list] = {}
    for run in runs:
        by_key.setdefault((run.data.tags.get("ftcl.row"), run.data.tags.get("ftcl.stage")), []).append(run)
    for row in ("moco_v2", "+ft"):
        for stage in ("parent", "pretrain", "linear", "knn"):
            assert len(by_key.get((row, stage), [])) == 1, f"{row} {stage}: {sorted(by_key)}"
        parent = by_key[(row, "parent")][0].info.run_id
        pretrain, linear, knn = (by_key[(row, stage)][0] for stage in ("pretrain", "linear", "knn"))
        for run in (pretrain, linear, knn):
            assert run.data.tags["mlflow.parentRunId"] == parent
            assert run.data.tags["ftcl.launcher"] == "local" and run.data.tags["ftcl.seed"] == "0"
            assert run.info.status == "FINISHED"
        assert any(name.startswith("scores/") for name in pretrain.data.metrics)
        assert "linear/top1" in linear.data.metrics and "knn/top1" in knn.data.metrics
        scores = [a.path for a in client.list_artifacts(pretrain.info.run_id, "score_distribution")]
        assert any(p.endswith(".parquet") for p in scores) and any(p.endswith(".png") for p in scores), scores
    assert len(by_key[(None, "aggregate")]) == 1  # tables and plots, logged by `ftcl aggregate`


def test_snakemakes_own_report_holds_the_tables_and_plots_with_captions(tiny_run):
    assert tiny_run.proc.returncode == 0
    report = tiny_run.work / "snakemake-report.html"
    proc = snakemake(tiny_run.work, tiny_run.config, "--report", str(report))
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = report.read_text(errors="replace")
    for caption in ("paired difference to", "Score curves during pretraining", "self-contained report"):
        assert caption in text, caption
    for name in ("ablation.md", "accuracy.png", "score_curves.png", "score_histograms.png", "knn_curves.png",
                 "report.html"):
        assert name in text, name


def test_an_unchanged_pipeline_or_new_launcher_settings_rerun_nothing(tiny_run):
    assert tiny_run.proc.returncode == 0
    proc = snakemake(tiny_run.work, tiny_run.config, "-n")
    assert planned_jobs(proc) == [] and "Nothing to be done" in proc.stdout + proc.stderr
    cfg = copy.deepcopy(TINY)
    cfg["launcher"]["local"] = {"cpus_per_task": 2, "timeout_min": 60}
    assert planned_jobs(snakemake(tiny_run.work, write_config(tiny_run.work, cfg, "launcher.yaml"), "-n")) == []


def _edited(tiny_run, name: str, edit) -> set[tuple[str, str | None]]:
    """The (rule, row) pairs a dry run plans after ``edit(config)``, without the bookkeeping rules
    (``pipeline_config`` rewrites the aggregation's copy of the config, ``all`` is the target)."""
    cfg = copy.deepcopy(TINY)
    edit(cfg)
    jobs = planned_jobs(snakemake(tiny_run.work, write_config(tiny_run.work, cfg, name), "-n"))
    return {(rule, row) for rule, row in jobs if rule not in ("pipeline_config", "all")}


ROWS = [row["name"] for row in TINY["ablations"]]


def _set(*path_value):
    *path, value = path_value

    def edit(cfg):
        node = cfg
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = value

    return edit


@pytest.mark.parametrize(("edit", "planned"), [
    (_set("defaults", "eval", "knn", "k", 10), {("knn", r) for r in ROWS} | {("aggregate", None)}),
    (_set("defaults", "eval", "linear", "epochs", 4), {("linear", r) for r in ROWS} | {("aggregate", None)}),
    (_set("defaults", "detection", "iterations", 5), {("detection", r) for r in ROWS} | {("aggregate", None)}),
    # a new store: the experiment is created there and the aggregate run (tables, plots) logged to it;
    # the finished stages' runs stay in the old store (their results do not change)
    (_set("tracking", "uri", "sqlite:///other.db"), {("mlflow_experiment", None), ("aggregate", None)}),
    (_set("defaults", "log_every", 3), set()),
    (_set("defaults", "optim", "compile", True), set()),
    (_set("launcher", "local", "timeout_min", 60), set()),
], ids=["eval.knn.k", "eval.linear.epochs", "detection.iterations", "tracking.uri", "log_every", "optim.compile",
        "launcher"])
def test_an_edit_reruns_exactly_the_stages_that_read_the_key(tiny_run, edit, planned):
    assert tiny_run.proc.returncode == 0
    assert _edited(tiny_run, "edit.yaml", edit) == planned


def test_editing_one_row_reruns_only_that_row_and_a_new_seed_or_row_only_itself(tiny_run):
    assert tiny_run.proc.returncode == 0
    jobs = _edited(tiny_run, "edited.yaml", lambda cfg: cfg["ablations"][1]["overrides"].update(
        {"ft.positive.alpha": 3.0}))
    assert jobs == {(stage, "+ft") for stage in TINY["stages"]} | {("aggregate", None)}

    jobs = _edited(tiny_run, "seeds.yaml", lambda cfg: cfg.update(seeds=[0, 1]))
    assert {rule for rule, _ in jobs} == {*TINY["stages"], "aggregate"}
    seeds = planned_seeds(snakemake(tiny_run.work, tiny_run.work / "seeds.yaml", "-n"))
    assert seeds == {1}

    jobs = _edited(tiny_run, "added.yaml", lambda cfg: cfg["ablations"].append(
        {"name": "+pos_extrapolation", "overrides": {"ft.positive.mode": "extrapolate"}}))
    assert {row for _, row in jobs} == {"+pos_extrapolation", None}
    assert _edited(tiny_run, "removed.yaml", lambda cfg: cfg["ablations"].pop()) == {("aggregate", None)}


def planned_seeds(proc: subprocess.CompletedProcess) -> set[int]:
    assert proc.returncode == 0, proc.stderr
    return {int(s) for s in re.findall(r"wildcards: row=\S+, seed=(\d+)", proc.stdout + proc.stderr)}


def _unknown_key(cfg, tmp):
    cfg["ablations"][1]["overrides"]["ft.positive.mdoe"] = "extrapolate"
    return ["ablation row '+ft'", "'ft.positive.mdoe'"]


def _duplicate_name(cfg, tmp):
    cfg["ablations"][1]["name"] = "moco_v2"
    return ["ablation row 'moco_v2'", "two rows"]


def _missing_dataset_root(cfg, tmp):
    cfg["ablations"][1]["overrides"]["data.root"] = str(tmp / "no-such-folder")
    return ["ablation row '+ft'", "'data.root'", "does not exist"]


def _bad_value(cfg, tmp):
    cfg["ablations"][0]["overrides"]["optim.epochs"] = -1
    return ["ablation row 'moco_v2'", "'optim.epochs'"]


def _pipeline_key_in_a_row(cfg, tmp):
    cfg["ablations"][1]["overrides"]["seed"] = 3
    return ["ablation row '+ft'", "'seed'", "set by the pipeline"]


def _two_baselines(cfg, tmp):
    cfg["ablations"][1]["baseline"] = True
    return ["exactly one ablation row", "'moco_v2', '+ft'"]


def _compare_to_an_unknown_row(cfg, tmp):
    cfg["ablations"][1]["compare_to"] = "byol"
    return ["ablation row '+ft'", "compare_to 'byol' must name another row"]


def _unknown_launcher_setting(cfg, tmp):
    cfg["launcher"]["local"]["partition"] = "gpu"
    return ["launcher.local", "'partition'"]


def _experiment_outside_the_results(cfg, tmp):
    cfg["experiment"] = ".."
    return ["key 'experiment'", "'..'"]


def _bad_grid_key(cfg, tmp):
    cfg["ablations"].append({"name": "+g", "grid": {"ft.positive.alpah": [1.0, 2.0]}})
    return ["ablation row '+g[alpah=1]'", "'ft.positive.alpah'"]


def _bn_splits_not_dividing_the_batch(cfg, tmp):
    cfg["ablations"][1]["overrides"]["method.bn_splits"] = 3
    return ["ablation row '+ft'", "'method.bn_splits' is 3", "does not divide the per-process batch"]


def _a_slurm_world_that_cannot_share_the_batch(cfg, tmp):
    # checked for the processes the SLURM job would get, on the host that plans: before anything is queued
    cfg["launcher"] = {**cfg["launcher"], "name": "slurm", "stages": {"pretrain": {"gpus_per_node": 3}}}
    return ["'optim.batch_size'", "3 processes cannot share equally"]


@pytest.mark.parametrize("breaks", [_unknown_key, _duplicate_name, _missing_dataset_root, _bad_value,
                                    _pipeline_key_in_a_row, _two_baselines, _compare_to_an_unknown_row,
                                    _unknown_launcher_setting, _experiment_outside_the_results, _bad_grid_key,
                                    _bn_splits_not_dividing_the_batch, _a_slurm_world_that_cannot_share_the_batch],
                         ids=lambda f: f.__name__.strip("_"))
def test_a_bad_config_fails_before_any_job_naming_the_row_and_key(tmp_path, breaks):
    cfg = copy.deepcopy(TINY)
    expected = breaks(cfg, tmp_path)
    proc = snakemake(tmp_path, write_config(tmp_path, cfg), "-c1")
    assert proc.returncode != 0
    for text in expected:
        assert text in proc.stderr, proc.stderr
    assert not (tmp_path / "results").exists()  # nothing was written, no job was submitted
    assert not (tmp_path / "pipeline.yaml").exists() and not (tmp_path / "a").exists()  # nor above results/


def test_the_lint_is_clean(tmp_path):
    proc = snakemake(tmp_path, write_config(tmp_path, TINY), "--lint")
    assert proc.returncode == 0 and "Congratulations" in proc.stdout + proc.stderr, proc.stdout + proc.stderr


SHIPPED_CONFIGS = sorted(str(p.relative_to(REPO / "config")) for p in (REPO / "config").rglob("*.yaml")
                         if "overlays" not in p.parts)  # overlays are merged into a config, not run alone


@pytest.mark.parametrize("name", SHIPPED_CONFIGS)
def test_every_shipped_config_plans_each_row_and_seed(tmp_path, name):
    cfg = yaml.safe_load((REPO / "config" / name).read_text())
    data = cfg["defaults"]["data"]
    data["root"] = str(tmp_path / "data")  # stands in for the user's dataset copy
    (tmp_path / "data").mkdir()
    if data.get("class_list"):
        data["class_list"] = str(REPO / data["class_list"])
    detection = cfg["defaults"].get("detection") or {}
    if detection.get("root"):
        detection["root"] = str(tmp_path / "voc")  # stands in for the user's VOCdevkit folder
        (tmp_path / "voc").mkdir()
    jobs = planned_jobs(snakemake(tmp_path, write_config(tmp_path, cfg), "-n"))
    from ftcl import pipeline

    rows = pipeline.load(cfg, check_paths=False).row_names  # grid rows expanded
    for stage in cfg["stages"]:
        assert sum(1 for rule, _ in jobs if rule == stage) == len(rows) * len(cfg["seeds"]), stage
    assert {row for _, row in jobs if row} == set(rows)
    assert sum(1 for row in cfg["ablations"] if row.get("baseline")) == 1
    assert len(rows) >= len(cfg["ablations"])
    assert ("aggregate", None) in jobs


# Last in the file: it changes the shared finished pipeline of `tiny_run`.
def test_a_changed_pretraining_key_moves_the_finished_folders_aside_and_deletes_nothing(tiny_run):
    from mlflow.tracking import MlflowClient

    assert tiny_run.proc.returncode == 0
    run_dir = tiny_run.exp_dir / "+ft" / "seed0"
    before = {p.relative_to(run_dir / "pretrain") for p in (run_dir / "pretrain").rglob("*") if p.is_file()}
    old_run_id = (run_dir / "pretrain" / ".mlflow_run_id").read_text()
    cfg = copy.deepcopy(TINY)
    cfg["ablations"][1]["overrides"]["ft.positive.alpha"] = 3.0
    proc = snakemake(tiny_run.work, write_config(tiny_run.work, cfg, "changed.yaml"), "-c2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    moved = sorted((run_dir / ".superseded").iterdir())
    assert {p.name.split("-")[0] for p in moved} == set(TINY["stages"])
    old_pretrain = next(p for p in moved if p.name.startswith("pretrain-"))
    assert {p.relative_to(old_pretrain) for p in old_pretrain.rglob("*") if p.is_file()} >= before
    assert (old_pretrain / "checkpoints" / "last.pt").stat().st_size > 0 and (old_pretrain / "pretrain.json").is_file()
    log = (tiny_run.exp_dir / "logs" / "pretrain" / "+ft" / "seed0.log").read_text()
    assert "ft.positive.alpha (2.0 -> 3.0)" in log and str(old_pretrain) in log
    assert yaml.safe_load((run_dir / "pretrain" / "config.yaml").read_text())["ft"]["positive"]["alpha"] == 3.0
    assert not (tiny_run.exp_dir / "moco_v2" / "seed0" / ".superseded").exists()  # the other row is untouched
    client = MlflowClient(f"sqlite:///{tiny_run.work / 'results' / 'mlflow.db'}")
    assert "ftcl.superseded" in client.get_run(old_run_id).data.tags
    assert client.get_run(old_run_id).info.lifecycle_stage == "active"  # tagged, never deleted
