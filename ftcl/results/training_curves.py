"""Accuracy over training: the kNN monitor's curves (``eval.monitor``, :mod:`ftcl.monitor`) of every row
and seed, summarised per row and epoch, and drawn as ``knn_curves.png``:

* left: kNN top-1 against the epoch, per row the mean over seeds with the seeds' range as a band,
  and the floor row (a random initialisation: its only point is epoch 0) as a dashed line;
* right: each row's paired difference to its reference row (the baseline, or ``compare_to``) at
  every epoch both evaluated, with its 95 % t interval (:func:`ftcl.results.stats.difference`), and 0.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path

import pandas as pd
from matplotlib.ticker import MaxNLocator

from ftcl.monitor import read_curve
from ftcl.results.figures import figure, row_palette, save
from ftcl.results.stats import difference

CURVE_COLUMNS = ["row", "seed", "epoch", "knn_top1"]


def monitor_curves(frame: pd.DataFrame) -> pd.DataFrame:
    """One line per row, seed and monitored epoch (``frame``: :func:`ftcl.results.read.collect`)."""
    lines = [{"row": row, "seed": seed, "epoch": int(point["epoch"]), "knn_top1": float(point["knn_top1"])}
             for row, seed, run_dir in frame[["row", "seed", "run_dir"]].itertuples(index=False)
             for point in read_curve(Path(run_dir) / "pretrain")]
    return pd.DataFrame(lines, columns=CURVE_COLUMNS)


def curve_summary(curves: pd.DataFrame, references: Mapping[str, str]) -> pd.DataFrame:
    """Per row and epoch: ``mean``, ``low``/``high`` (the seeds' range), ``n``, and against the row's
    reference (``references[row]``) at the same epoch: ``delta``, ``delta_low``, ``delta_high``."""
    lines = []
    for (row, epoch), group in curves.groupby(["row", "epoch"], sort=False):
        values = dict(zip(group["seed"], group["knn_top1"]))
        line = {"row": row, "epoch": epoch, "mean": group["knn_top1"].mean(), "low": group["knn_top1"].min(),
                "high": group["knn_top1"].max(), "n": len(group)}
        ref = references.get(row)
        theirs = curves[(curves["row"] == ref) & (curves["epoch"] == epoch)] if ref else curves.iloc[:0]
        d = difference(values, dict(zip(theirs["seed"], theirs["knn_top1"]))) if len(theirs) else None
        line.update({"delta": d.delta if d else math.nan, "delta_low": d.low if d else math.nan,
                     "delta_high": d.high if d else math.nan})
        lines.append(line)
    return pd.DataFrame(lines, columns=["row", "epoch", "mean", "low", "high", "n", "delta", "delta_low",
                                        "delta_high"])


def knn_curves_plot(curves: pd.DataFrame, path: str | Path, references: Mapping[str, str],
                    floor: str | None = None) -> Path | None:
    """``knn_curves.png`` (module docstring); None when no run has a curve."""
    if curves.empty:
        return None
    summary = curve_summary(curves, references)
    rows = list(dict.fromkeys(curves["row"]))
    palette = row_palette(rows)
    fig, grid = figure(1, 2, (12, 4.2))
    left, right = grid[0]
    last = int(curves["epoch"].max())
    for row in rows:
        mine = summary[summary["row"] == row]
        if row == floor or (len(mine) == 1 and mine["epoch"].iloc[0] == 0):
            level = mine["mean"].iloc[0]
            left.axhline(level, color=palette[row], linestyle="--", linewidth=1.2, label=f"{row} (epoch 0)")
            continue
        left.plot(mine["epoch"], mine["mean"], color=palette[row], marker="o", markersize=3, linewidth=1.6,
                  label=row)
        if mine["n"].max() > 1:
            left.fill_between(mine["epoch"], mine["low"], mine["high"], color=palette[row], alpha=0.18, linewidth=0)
        paired = mine[mine["delta"].notna() & (mine["epoch"] > 0)]
        if len(paired) and row != floor:
            right.plot(paired["epoch"], paired["delta"], color=palette[row], marker="o", markersize=3,
                       linewidth=1.6, label=f"{row} − {references[row]}")
            ok = paired["delta_low"].notna()
            right.fill_between(paired["epoch"][ok], paired["delta_low"][ok], paired["delta_high"][ok],
                               color=palette[row], alpha=0.18, linewidth=0)
    right.axhline(0.0, color="grey", linewidth=1)
    for ax in (left, right):
        ax.set_xlim(0, max(last, 1))
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    left.set(title="kNN top-1 over training", xlabel="epoch", ylabel="kNN top-1 (%)")
    right.set(title="Paired difference to the reference row", xlabel="epoch", ylabel="Δ kNN top-1 (points)")
    left.legend(fontsize=8, loc="best")
    if right.lines[1:] or right.collections:
        right.legend(fontsize=8, loc="best")
    n_seeds = curves.groupby("row")["seed"].nunique().max()
    fig.suptitle(f"Accuracy over training (eval.monitor: kNN on the test split; mean over {n_seeds} seeds, "
                 "band: seed range; right: paired Δ by seed with its 95% t interval)")
    return save(fig, Path(path))
