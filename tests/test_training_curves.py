"""Accuracy over training in the aggregate: each row's kNN curve over its seeds, the paired difference
to its reference at every epoch, and the plot drawn from the run folders' monitor.json files."""

import math

import pandas as pd
import pytest

from ftcl.monitor import write_curve
from ftcl.results.plots import make_plots
from ftcl.results.stats import ablation_table, difference
from ftcl.results.training_curves import curve_summary, knn_curves_plot, monitor_curves

CURVES = {  # row -> seed -> [knn_top1 at epoch 0, 1, 2]
    "base": {0: [20.0, 40.0, 50.0], 1: [22.0, 44.0, 52.0], 2: [21.0, 41.0, 55.0]},
    "+ft": {0: [20.0, 35.0, 52.0], 1: [22.0, 40.0, 57.0], 2: [21.0, 36.0, 60.0]},
    "floor": {0: [20.0], 1: [22.0], 2: [21.0]},
}


def frame_with_run_folders(tmp_path):
    lines = []
    for row, seeds in CURVES.items():
        for seed, values in seeds.items():
            run_dir = tmp_path / row / f"seed{seed}"
            (run_dir / "pretrain").mkdir(parents=True)
            write_curve(run_dir / "pretrain", [{"epoch": e, "knn_top1": v} for e, v in enumerate(values)])
            lines.append({"row": row, "seed": seed, "run_dir": str(run_dir), "knn_top1": values[-1]})
    return pd.DataFrame(lines)


def test_the_summary_holds_each_rows_mean_range_and_paired_difference_per_epoch(tmp_path):
    curves = monitor_curves(frame_with_run_folders(tmp_path))
    assert len(curves) == 3 * 3 + 3 * 3 + 3
    summary = curve_summary(curves, {"+ft": "base", "floor": "base"}).set_index(["row", "epoch"])
    line = summary.loc[("+ft", 2)]
    assert (line["mean"], line["low"], line["high"], line["n"]) == (pytest.approx(169 / 3), 52.0, 60.0, 3)
    d = difference({0: 52.0, 1: 57.0, 2: 60.0}, {0: 50.0, 1: 52.0, 2: 55.0})
    assert (line["delta"], line["delta_low"], line["delta_high"]) == pytest.approx((d.delta, d.low, d.high))
    assert math.isnan(summary.loc[("base", 1), "delta"])  # the reference has none
    assert summary.loc[("floor", 0), "delta"] == pytest.approx(0.0)


def test_aggregation_draws_the_curves_from_the_run_folders(tmp_path):
    frame = frame_with_run_folders(tmp_path)
    table = ablation_table(frame.assign(protocol=""), "base", ["knn_top1"])
    made = make_plots(frame, tmp_path / "plots", table)
    path = made["kNN accuracy over training"]
    assert path.name == "knn_curves.png" and path.stat().st_size > 20_000  # a drawn figure, not the placeholder


def test_without_curves_there_is_no_plot(tmp_path):
    assert knn_curves_plot(monitor_curves(pd.DataFrame({"row": ["a"], "seed": [0], "run_dir": [str(tmp_path)]})),
                           tmp_path / "k.png", {}) is None
