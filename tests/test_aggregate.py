"""Aggregation: tables, plots, report.html and the MLflow side (``ftcl aggregate``, ``ftcl table``).

The run folders are fake but follow the run-folder contract: 2 rows x 2 seeds, JSON results with
chosen numbers (so means, stds and deltas can be checked by hand) and parquet score files.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from ftcl import pipeline
from ftcl.config import ConfigError
from ftcl.results import command, render, stats
from ftcl.results.plots import make_plots
from ftcl.results.read import MissingResultsError, frame_from_mlflow
from ftcl.results.read import collect as collect_runs

EXPERIMENT = "agg-test"
ROWS = ["moco_v2", "+ft"]
# row -> seed -> (linear top1, knn top1, detection VOC07 AP50, detection VOC07 AP); +ft has no detection
RESULTS = {
    "moco_v2": {0: (70.0, 65.0, 80.0, 50.0), 1: (72.0, 66.0, 82.0, 52.0)},
    "+ft": {0: (68.0, 61.0, None, None), 1: (69.0, 64.0, None, None)},
}
ITERS_PER_EPOCH, EPOCHS, BINS = 12, 2, 20


def pipeline_config(tmp_path: Path, **extra) -> dict:
    return {
        "experiment": EXPERIMENT,
        "results_dir": str(tmp_path / "results"),
        "ablations": [
            {"name": "moco_v2", "baseline": True, "description": "plain MoCo v2", "overrides": {},
             "published": {"linear_top1": 67.5, "det_voc07_AP50": 82.4}},
            {"name": "+ft", "description": "positive extrapolation and negative interpolation",
             "overrides": {"ft.positive.mode": "extrapolate", "ft.negative.mode": "interpolate"}},
        ],
        "seeds": [0, 1],
        "stages": ["pretrain", "linear", "knn", "detection"],
        **extra,
    }


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


def _write_scores(scores_dir: Path, rng: np.random.Generator, pos_level: float) -> None:
    scores_dir.mkdir(parents=True, exist_ok=True)
    for epoch in range(EPOCHS):
        it = np.arange(epoch * ITERS_PER_EPOCH, (epoch + 1) * ITERS_PER_EPOCH)
        pos = pos_level + 0.1 * np.tanh(it / 10) + rng.normal(0, 0.01, it.size)
        neg = 0.5 * np.exp(-it / 8) + rng.normal(0, 0.01, it.size)
        pd.DataFrame({
            "epoch": epoch, "iteration": it, "loss": 8 - it / 10, "pos_mean": pos, "neg_mean": neg,
            "neg_var": 0.05 + 0 * it, "exp_neg_mean": np.exp(neg / 0.2), "exp_pos_mean": np.exp(pos / 0.2),
            "lr": 0.03 + 0 * it,
        }).to_parquet(scores_dir / f"epoch_{epoch:04d}.parquet")
        edges = np.linspace(-1, 1, BINS + 1)
        centres = (edges[:-1] + edges[1:]) / 2
        pd.DataFrame({
            "bin_left": edges[:-1], "bin_right": edges[1:],
            "pos_count": np.round(1000 * np.exp(-((centres - pos_level) ** 2) / 0.02)).astype(np.int64),
            "neg_count": np.round(50000 * np.exp(-(centres**2) / 0.05)).astype(np.int64),
            "epoch": epoch,
        }).to_parquet(scores_dir / f"hist_epoch_{epoch:04d}.parquet")


def make_run_folders(tmp_path: Path) -> Path:
    exp_dir = tmp_path / "results" / EXPERIMENT
    rng = np.random.default_rng(0)
    for row, seeds in RESULTS.items():
        for seed, (lin, knn, ap50, ap) in seeds.items():
            run = exp_dir / row / f"seed{seed}"
            _write_json(run / "pretrain" / "pretrain.json", {"epochs": EPOCHS, "final_loss": 6.0})
            _write_scores(run / "pretrain" / "scores", rng, 0.8 if row == "moco_v2" else 0.6)
            protocol = {"epochs": 60, "lr": 30.0, "augment": False}
            _write_json(run / "linear" / "linear.json",
                        {"top1": lin, "top5": 99.0, "protocol": protocol, "checkpoint": "x.pt"})
            _write_json(run / "knn" / "knn.json",
                        {"top1": knn, "top5": 98.0, "protocol": {"k": 200, "temperature": 0.1},
                         "checkpoint": "x.pt"})
            if ap50 is not None:
                _write_json(run / "detection" / "detection.json",
                            {"voc07_AP": ap, "voc07_AP50": ap50, "voc07_AP75": ap - 5, "coco_AP50": ap50 - 1,
                             "protocol": {"iterations": 200}})
    return exp_dir


@pytest.fixture
def runs(tmp_path: Path) -> tuple[dict, Path]:
    return pipeline_config(tmp_path), make_run_folders(tmp_path)


def cli(argv: list[str]) -> int:
    """The command's handler as ``ftcl`` dispatches it (errors propagate, unlike ``ftcl.cli.main``)."""
    from ftcl.cli import build_parser

    args = build_parser().parse_args(argv)
    return args.func(args)


def pipe(cfg: dict):
    return pipeline.load(cfg, resolve_runs=False)


def collect(cfg: dict, **kwargs) -> pd.DataFrame:
    return collect_runs(pipe(cfg), **kwargs)


def ablation_table(frame: pd.DataFrame, baseline: str, references: dict | None = None) -> pd.DataFrame:
    return stats.ablation_table(frame, baseline, render.TABLE_METRICS, references)


def published(cfg: dict) -> dict:
    return {r.name: r.published for r in pipe(cfg).rows if r.published}


def test_only_requested_stages_and_the_datasets_own_metric_family_are_read(runs):
    cfg, exp_dir = runs
    frame = collect({**cfg, "stages": ["pretrain", "linear", "knn"]})
    assert frame["det_voc07_AP50"].isna().all()  # detection is not a requested stage
    result = exp_dir / "moco_v2" / "seed0" / "detection" / "detection.json"
    data = json.loads(result.read_text())
    result.write_text(json.dumps({**data, "protocol": {"primary": "voc07"}}))
    frame = collect(cfg)
    assert frame.loc[0, "det_voc07_AP50"] == data["voc07_AP50"]
    assert math.isnan(frame.loc[0, "det_coco_AP50"])  # COCO-style AP of a VOC run is not "COCO AP"


def test_collect_gives_one_line_per_row_and_seed_with_metrics(runs):
    cfg, _ = runs
    frame = collect(cfg)
    pairs = list(zip(frame["row"], frame["seed"], strict=True))
    assert pairs == [("moco_v2", 0), ("moco_v2", 1), ("+ft", 0), ("+ft", 1)]
    assert frame["linear_top1"].tolist() == [70.0, 72.0, 68.0, 69.0]
    assert frame.loc[0, "det_coco_AP50"] == 79.0  # no `primary` in this protocol: every family is read
    assert "linear: epochs=60, lr=30.0, augment=false" in frame.loc[0, "protocol"]


def test_ablation_table_means_stds_and_deltas_match_hand_computed_values(runs):
    cfg, _ = runs
    table = ablation_table(collect(cfg), "moco_v2")
    assert table["row"].tolist() == ROWS
    for metric in ("linear_top1", "knn_top1", "det_voc07_AP50", "det_voc07_AP"):
        for suffix in ("mean", "std", "delta", "n", "ci_low", "ci_high", "delta_low", "delta_high", "delta_n",
                       "delta_method", "delta_excludes_zero"):
            assert f"{metric}_{suffix}" in table.columns
    assert {"n_seeds", "protocol"} <= set(table.columns)
    base, ft = table.iloc[0], table.iloc[1]
    assert base["linear_top1_mean"] == pytest.approx(71.0)
    assert base["linear_top1_std"] == pytest.approx(math.sqrt(2))  # sample std of 70, 72
    assert ft["linear_top1_mean"] == pytest.approx(68.5)
    assert ft["linear_top1_std"] == pytest.approx(math.sqrt(0.5))
    assert ft["linear_top1_delta"] == pytest.approx(-2.5)
    assert ft["knn_top1_delta"] == pytest.approx(62.5 - 65.5)
    # paired by seed: differences (-2, -3); t(0.975, 1) = 12.7062; sd 0.7071; half width 6.353
    assert ft["linear_top1_delta_low"] == pytest.approx(-2.5 - 12.706204736 * math.sqrt(0.5) / math.sqrt(2))
    assert ft["linear_top1_delta_method"] == "paired t" and not ft["linear_top1_delta_excludes_zero"]
    assert pd.isna(base["reference"]) and math.isnan(base["linear_top1_delta"])
    assert base["det_voc07_AP50_mean"] == pytest.approx(81.0)
    assert base["det_voc07_AP_std"] == pytest.approx(math.sqrt(2))
    assert table["n_seeds"].tolist() == [2, 2]


def test_compare_to_refers_a_rows_deltas_to_another_row(runs, tmp_path):
    cfg, _ = runs
    # a third row (a copy of +ft's folders) compared with +ft, not with the baseline
    exp_dir = tmp_path / "results" / EXPERIMENT
    shutil.copytree(exp_dir / "+ft", exp_dir / "+ft+more")
    (exp_dir / "+ft+more" / "seed0" / "linear" / "linear.json").write_text(json.dumps(
        {"top1": 71.0, "top5": 99.0, "protocol": {"epochs": 60, "lr": 30.0, "augment": False}, "checkpoint": "x"}))
    cfg["ablations"].append({"name": "+ft+more", "compare_to": "+ft", "overrides": {}})
    table = ablation_table(collect(cfg), "moco_v2", references=pipe(cfg).references)
    more = table.set_index("row").loc["+ft+more"]
    assert more["reference"] == "+ft"
    assert more["linear_top1_delta"] == pytest.approx((71.0 + 69.0) / 2 - 68.5)  # vs +ft, not vs moco_v2 (71.0)
    assert table.set_index("row").loc["+ft", "linear_top1_delta"] == pytest.approx(-2.5)  # still vs the baseline
    shown = render.display_ablation(table)
    assert shown["Δ vs"].tolist() == ["", "moco_v2", "+ft"]
    assert any("column 'Δ vs'" in note for note in render.table_notes(table))

    cfg["ablations"][-1]["compare_to"] = "byol"
    with pytest.raises(ConfigError, match=r"'\+ft\+more': compare_to 'byol' must name another row"):
        pipe(cfg)


def test_missing_detection_leaves_nan_columns(runs):
    cfg, _ = runs
    frame = collect(cfg)
    assert frame.loc[frame["row"] == "+ft", ["det_voc07_AP50", "det_voc07_AP", "det_voc07_AP75"]].isna().all().all()
    ft = ablation_table(frame, "moco_v2").set_index("row").loc["+ft"]
    assert math.isnan(ft["det_voc07_AP50_mean"]) and math.isnan(ft["det_voc07_AP_delta"])
    assert ft["det_voc07_AP50_n"] == 0


def test_missing_row_folder_is_an_error_naming_it_unless_allowed(runs, tmp_path):
    cfg, _ = runs
    cfg["ablations"].append({"name": "+neg_interpolation", "overrides": {}})
    with pytest.raises(MissingResultsError, match=r"\+neg_interpolation"):
        collect(cfg)
    assert cli(["aggregate", "--configfile", _dump(cfg, tmp_path), "--no-mlflow"]) == 2
    frame = collect(cfg, allow_missing=True)
    assert "+neg_interpolation" not in set(frame["row"])


def test_paper_table_compares_with_published_numbers(runs):
    cfg, _ = runs
    paper = stats.paper_table(collect(cfg), published(cfg))
    assert paper[["row", "metric"]].values.tolist() == [["moco_v2", "linear_top1"], ["moco_v2", "det_voc07_AP50"]]
    assert paper["ours_mean"].tolist() == pytest.approx([71.0, 81.0])
    assert paper["difference"].tolist() == pytest.approx([3.5, -1.4])


def test_tables_are_written_as_csv_markdown_and_latex(runs, tmp_path):
    cfg, exp_dir = runs
    frame = collect(cfg)
    floor = stats.against(frame, "+ft", render.FLOOR_METRICS)
    files = render.write_tables(ablation_table(frame, "moco_v2"), stats.paper_table(frame, published(cfg)), floor,
                                exp_dir / "tables")
    names = sorted(p.name for p in files)
    assert names == ["ablation.csv", "ablation.md", "ablation.tex", "floor.csv", "floor.md", "floor.tex",
                     "paper.csv", "paper.md", "paper.tex"]
    csv = pd.read_csv(exp_dir / "tables" / "ablation.csv")
    assert csv["linear_top1_mean"].tolist() == pytest.approx([71.0, 68.5])
    # the CSV holds 4 decimals (float_format="%.4f"): equal within half the last digit, not within a relative
    # tolerance that happens to cover the rounding of this one number
    assert csv["linear_top1_delta_high"].tolist()[1] == pytest.approx(-2.5 + 6.353102368, rel=0, abs=0.5e-4 + 1e-9)
    md = (exp_dir / "tables" / "ablation.md").read_text()
    assert "| moco_v2" in md and "| +ft" in md and "71.00 ± 1.41" in md and "-2.50 [-8.85, +3.85]" in md
    assert "excludes 0" in md
    assert "+2.50 [-3.85, +8.85]" in (exp_dir / "tables" / "floor.md").read_text()
    tex = (exp_dir / "tables" / "ablation.tex").read_text()
    assert r"\toprule" in tex and r"moco\_v2" in tex and r"$71.00 \pm 1.41$" in tex and r"\bottomrule" in tex
    assert "82.40" in (exp_dir / "tables" / "paper.md").read_text()


def test_plots_are_written_as_nonempty_pngs(runs):
    cfg, exp_dir = runs
    frame = collect(cfg)
    plots = make_plots(frame, exp_dir / "plots", ablation_table(frame, "moco_v2"))
    names = sorted(p.name for p in plots.values())
    assert names == ["accuracy.png", "knn_curves.png", "score_curves.png", "score_histograms.png"]
    for path in plots.values():
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000


def test_report_holds_every_row_and_embeds_the_plots(runs):
    cfg, exp_dir = runs
    out = command.run_aggregate(pipe(cfg), mlflow=False, command="ftcl aggregate --configfile c.yaml")
    text = out["report"].read_text()
    assert out["report"] == exp_dir / "report.html"
    table = re.search(r'<table[^>]*id="ablation-table".*?</table>', text, re.S).group(0)
    first_cells = re.findall(r"<tr>\s*<td>([^<]*)</td>", table)
    assert first_cells == ["moco_v2", "+ft"]
    assert 'id="paper-table"' in text and EXPERIMENT in text and "ftcl aggregate --configfile c.yaml" in text
    assert text.count('src="data:image/png;base64,') == 4
    assert "http://" not in text and "https://" not in text  # self-contained


def _dump(cfg: dict, tmp_path: Path) -> str:
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def test_aggregate_command_logs_tables_plots_and_report_to_an_mlflow_run(runs, tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    cfg, exp_dir = runs
    configfile = _dump(cfg, tmp_path)
    assert cli(["aggregate", "--configfile", configfile]) == 0
    printed = capsys.readouterr().out
    assert "moco_v2" in printed and "+ft" in printed and "71.00 ± 1.41" in printed
    for name in ("ablation.csv", "ablation.md", "ablation.tex", "paper.csv", "paper.md", "paper.tex"):
        assert (exp_dir / "tables" / name).is_file()

    results = tmp_path / "results"
    client = MlflowClient(f"sqlite:///{results / 'mlflow.db'}")
    exp = client.get_experiment_by_name(EXPERIMENT)
    assert Path(exp.artifact_location) == results / "mlartifacts" / EXPERIMENT
    (run,) = client.search_runs([exp.experiment_id], filter_string="attributes.run_name = 'aggregate'")
    assert run.info.status == "FINISHED"
    top = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"tables", "plots", "report.html", "config"} <= top
    assert {a.path for a in client.list_artifacts(run.info.run_id, "plots")} == {
        "plots/accuracy.png", "plots/knn_curves.png", "plots/score_curves.png", "plots/score_histograms.png"}
    assert "tables/ablation.tex" in {a.path for a in client.list_artifacts(run.info.run_id, "tables")}
    assert not (tmp_path / "mlruns").exists() and not Path("mlruns").exists()

    assert cli(["aggregate", "--configfile", configfile]) == 0  # a rerun: the old aggregate run is kept, tagged
    runs = client.search_runs([exp.experiment_id], filter_string="attributes.run_name = 'aggregate'")
    assert len(runs) == 2
    assert "ftcl.superseded" in client.get_run(run.info.run_id).data.tags
    current = [r for r in runs if r.info.run_id != run.info.run_id]
    assert "ftcl.superseded" not in current[0].data.tags


def test_table_command_reads_metrics_back_from_mlflow_runs(tmp_path, capsys, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.chdir(tmp_path)  # no config/config.yaml of the checkout is picked up

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp_id = client.create_experiment("from-mlflow", artifact_location=str(tmp_path / "mlartifacts"))
    metrics = {"linear": ("linear/top1", 0), "knn": ("knn/top1", 1)}
    for row, seeds in RESULTS.items():
        for seed, values in seeds.items():
            tags = {"ftcl.row": row, "ftcl.seed": str(seed)}
            parent = client.create_run(exp_id, run_name=f"{row} · seed {seed}",
                                       tags={**tags, "ftcl.stage": "parent"})
            for stage, (name, index) in metrics.items():
                child = client.create_run(exp_id, run_name=stage, tags={
                    **tags, "ftcl.stage": stage, "mlflow.parentRunId": parent.info.run_id})
                client.log_metric(child.info.run_id, name, values[index])
                client.set_terminated(child.info.run_id)
            if values[2] is not None:
                child = client.create_run(exp_id, run_name="detection",
                                          tags={**tags, "ftcl.stage": "detection"})
                client.log_metric(child.info.run_id, "det/voc07_AP50", values[2])
                client.log_metric(child.info.run_id, "det/voc07_AP", values[3])
                client.set_terminated(child.info.run_id)

    frame = frame_from_mlflow(uri, "from-mlflow")
    assert frame["row"].tolist() == ["moco_v2", "moco_v2", "+ft", "+ft"]
    assert frame["knn_top1"].tolist() == [65.0, 66.0, 61.0, 64.0]
    assert frame["det_voc07_AP"].tolist()[:2] == [50.0, 52.0]
    assert frame.loc[frame["row"] == "+ft", "det_voc07_AP50"].isna().all()

    assert cli(["table", "--experiment", "from-mlflow", "--tracking-uri", uri, "--configfile",
                _dump(pipeline_config(tmp_path), tmp_path)]) == 0
    out = capsys.readouterr().out
    lines = {line.split("|")[1].strip(): line for line in out.splitlines() if line.startswith("| ")}
    assert "71.00 ± 1.41" in lines["moco_v2"] and "81.00 ± 1.41" in lines["moco_v2"]
    assert "68.50 ± 0.71" in lines["+ft"] and "-2.50 [" in lines["+ft"] and "-3.00 [" in lines["+ft"]

    assert cli(["table", "--experiment", "nope", "--tracking-uri", uri]) == 2
    assert "no MLflow experiment 'nope'" in capsys.readouterr().err


# --------------------------------------------------------------------------- row runs


def row_run_of(client, experiment_id: str, row: str):
    """The one current (not superseded) row run of ``row``."""
    runs = client.search_runs([experiment_id], f"tags.`ftcl.row` = '{row}' and tags.`ftcl.stage` = 'row'")
    (run,) = [r for r in runs if "ftcl.superseded" not in r.data.tags]
    return run


def table_numbers(table: pd.DataFrame, row: str, metrics, suffixes) -> dict[str, float]:
    """The table's numbers of ``row`` as the row run names them: ``<metric>/<suffix>``, NaN and metrics
    without a value (n = 0) left out."""
    line = table.set_index("row").loc[row]
    numbers = {f"{m}/{s}": float(line[f"{m}_{s}"]) for m in metrics for s in suffixes if line[f"{m}_n"]}
    return {k: v for k, v in numbers.items() if not math.isnan(v)}


def test_row_runs_hold_the_ablation_tables_numbers(runs, tmp_path):
    """After `ftcl aggregate`, each row's row run shows the table's mean, std and seed count of every
    headline metric and, against its reference row, the paired delta and its 95 % interval; plus the
    mean, std and count of the last epoch's positive and negative scores (not in the table)."""
    from mlflow.tracking import MlflowClient

    cfg, exp_dir = runs
    for row, seeds in RESULTS.items():  # pretrain.json with the last epoch's mean scores
        for seed in seeds:
            path = exp_dir / row / f"seed{seed}" / "pretrain" / "pretrain.json"
            pos, neg = (0.8, 0.1) if row == "moco_v2" else (0.6, 0.05)
            path.write_text(json.dumps({**json.loads(path.read_text()), "scores/pos_mean": pos + seed / 10,
                                        "scores/neg_mean": neg}))
    # a store from before row runs: a seed parent of moco_v2 with no row run above it
    client = MlflowClient(f"sqlite:///{tmp_path / 'results' / 'mlflow.db'}")
    exp_id = client.create_experiment(EXPERIMENT, artifact_location=str(tmp_path / "results" / "mlartifacts"))
    old_parent = client.create_run(exp_id, run_name="moco_v2 · seed 0", tags={
        "ftcl.row": "moco_v2", "ftcl.seed": "0", "ftcl.stage": "parent"}).info.run_id
    client.set_terminated(old_parent)

    assert cli(["aggregate", "--configfile", _dump(cfg, tmp_path)]) == 0
    table = ablation_table(collect(cfg), "moco_v2")
    base, ft = row_run_of(client, exp_id, "moco_v2"), row_run_of(client, exp_id, "+ft")
    assert base.info.run_name == "moco_v2" and ft.info.run_name == "+ft"
    assert ft.data.params == {"ft.positive.mode": "extrapolate", "ft.negative.mode": "interpolate"}
    assert base.data.params == {}
    assert "positive extrapolation and negative interpolation" in ft.data.tags["mlflow.note.content"]
    assert client.get_run(old_parent).data.tags["mlflow.parentRunId"] == base.info.run_id
    assert base.info.status == ft.info.status == "FINISHED"

    stats_ = ("mean", "std", "n")
    scores = {"moco_v2": (0.85, math.sqrt(0.005), 0.1), "+ft": (0.65, math.sqrt(0.005), 0.05)}
    for run, row in ((base, "moco_v2"), (ft, "+ft")):
        expected = table_numbers(table, row, render.TABLE_METRICS, (*stats_, "delta", "delta_low", "delta_high"))
        pos, pos_std, neg = scores[row]
        expected.update({"scores_pos/mean": pos, "scores_pos/std": pos_std, "scores_pos/n": 2.0,
                         "scores_neg/mean": neg, "scores_neg/n": 2.0, "scores_neg/std": 0.0})
        assert run.data.metrics == pytest.approx(expected, rel=1e-12), row
    # the same numbers, checked by hand: mean ± std over 2 seeds, the paired delta and its t interval
    assert base.data.metrics["linear_top1/mean"] == 71.0 and base.data.metrics["linear_top1/n"] == 2
    assert base.data.metrics["linear_top1/std"] == pytest.approx(math.sqrt(2))
    assert base.data.metrics["det_voc07_AP50/mean"] == 81.0
    assert not any(name.endswith("/delta") for name in base.data.metrics)  # the baseline has no reference
    assert ft.data.metrics["linear_top1/delta"] == pytest.approx(-2.5)
    half = 12.706204736 * math.sqrt(0.5) / math.sqrt(2)  # t(0.975, 1) sd(-2, -3) / sqrt(2)
    assert ft.data.metrics["linear_top1/delta_low"] == pytest.approx(-2.5 - half)
    assert ft.data.metrics["linear_top1/delta_high"] == pytest.approx(-2.5 + half)
    assert not any(name.startswith("det_") for name in ft.data.metrics)  # no detection result: no metric
    assert "scores_pos_mean" not in table.columns  # the scores are the row runs' only


def test_row_runs_follow_the_table_when_a_seed_run_is_superseded(runs, tmp_path):
    """A stage folder moved aside (superseded) no longer counts: the next aggregation's numbers are
    the row run's latest values, logged at a new step; a number the table no longer has is NaN."""
    from mlflow.tracking import MlflowClient

    cfg, exp_dir = runs
    configfile = _dump(cfg, tmp_path)
    assert cli(["aggregate", "--configfile", configfile]) == 0
    client = MlflowClient(f"sqlite:///{tmp_path / 'results' / 'mlflow.db'}")
    exp_id = client.get_experiment_by_name(EXPERIMENT).experiment_id
    first = row_run_of(client, exp_id, "+ft")
    assert first.data.metrics["linear_top1/mean"] == 68.5 and first.data.metrics["linear_top1/n"] == 2

    seed1 = exp_dir / "+ft" / "seed1"
    (seed1 / ".superseded").mkdir()
    (seed1 / "linear").rename(seed1 / ".superseded" / "linear")
    assert cli(["aggregate", "--configfile", configfile]) == 0
    table = ablation_table(collect(cfg), "moco_v2")
    now = row_run_of(client, exp_id, "+ft")
    assert now.info.run_id == first.info.run_id  # the same row run, updated
    metrics = now.data.metrics
    assert metrics["linear_top1/mean"] == 68.0 and metrics["linear_top1/n"] == 1
    assert metrics["linear_top1/delta"] == pytest.approx(table.set_index("row").loc["+ft", "linear_top1_delta"])
    for name in ("linear_top1/std", "linear_top1/delta_low", "linear_top1/delta_high"):  # one seed: none
        assert math.isnan(metrics[name]), name
    assert {k: v for k, v in metrics.items() if not math.isnan(v)} == pytest.approx(
        table_numbers(table, "+ft", render.TABLE_METRICS, ("mean", "std", "n", "delta", "delta_low", "delta_high")))
    history = sorted(client.get_metric_history(now.info.run_id, "linear_top1/mean"), key=lambda m: m.step)
    assert [(m.step, m.value) for m in history] == [(1, 68.5), (2, 68.0)]


def test_aggregation_keeps_one_row_run_per_row(runs, tmp_path):
    """Two row runs of one row (stages that created them in the same instant): aggregation keeps
    the older, moves the seed parents of the other under it and deletes the other."""
    from mlflow.tracking import MlflowClient

    cfg, _ = runs
    client = MlflowClient(f"sqlite:///{tmp_path / 'results' / 'mlflow.db'}")
    exp_id = client.create_experiment(EXPERIMENT, artifact_location=str(tmp_path / "results" / "mlartifacts"))
    tags = {"ftcl.row": "+ft", "ftcl.stage": "row"}
    older = client.create_run(exp_id, run_name="+ft", tags=tags, start_time=1000).info.run_id
    newer = client.create_run(exp_id, run_name="+ft", tags=tags, start_time=2000).info.run_id
    parent = client.create_run(exp_id, run_name="+ft · seed 1", tags={
        "ftcl.row": "+ft", "ftcl.seed": "1", "ftcl.stage": "parent", "mlflow.parentRunId": newer}).info.run_id
    assert cli(["aggregate", "--configfile", _dump(cfg, tmp_path)]) == 0
    assert row_run_of(client, exp_id, "+ft").info.run_id == older
    assert client.get_run(newer).info.lifecycle_stage == "deleted"
    assert client.get_run(parent).data.tags["mlflow.parentRunId"] == older
