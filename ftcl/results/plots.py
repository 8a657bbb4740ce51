"""Aggregate plots over ablation rows and seeds (PNG via matplotlib's Agg canvas, seaborn styling).

* ``accuracy.png``: one panel per metric; a point per seed, a bar at the mean of each row with its
  95 % interval, the row's paired difference to its reference with that interval written under
  it (``*``: the interval excludes 0), and the baseline row's mean as a dashed line;
* ``score_curves.png``: the positive score ``q·k+`` and the mean negative score ``mean_i q·n_i``
  over training iterations, one line per row (mean over seeds, smoothed with a centred rolling
  mean; the band spans the seeds), as in Fig. 2 of Zhu et al., ICCV 2021 (FT);
* ``knn_curves.png``: kNN top-1 over training and its paired difference to the reference row
  (:mod:`ftcl.results.training_curves`);
* ``score_histograms.png``: the distributions of positive and negative scores at the last recorded
  epoch, one panel per row (counts summed over seeds, each normalised to a density).

Inputs are the frame of :func:`ftcl.results.read.collect` (its ``run_dir`` column points at the run
folders), the ablation table of :func:`ftcl.results.stats.ablation_table`, and the files of the
run-folder contract: ``pretrain/scores/epoch_XXXX.parquet`` and
``pretrain/scores/hist_epoch_XXXX.parquet``.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import pandas as pd
import seaborn as sns

from ftcl.results.figures import figure, placeholder_plot, row_palette, rows_of, save
from ftcl.results.render import METRIC_LABELS
from ftcl.results.training_curves import knn_curves_plot, monitor_curves
from ftcl.scores import display_edges, tail_label

log = logging.getLogger(__name__)

#: the metrics of the accuracy plot (labels: ftcl.results.render.METRIC_LABELS)
ACCURACY_METRICS: tuple[str, ...] = ("linear_top1", "knn_top1", "det_voc07_AP50", "det_voc07_AP", "det_coco_AP",
                                     "det_coco_AP50")
POS_COLOR, NEG_COLOR = "tab:blue", "tab:red"  # as the per-run plots of ftcl.scores
SCORE_COLUMNS = ["epoch", "iteration", "pos_mean", "neg_mean"]


def accuracy_plot(frame: pd.DataFrame, path: str | Path, table: pd.DataFrame | None = None) -> Path | None:
    """Seeds as points, the mean as a bar with its 95 % interval, per row; under each row its paired
    difference to its reference with that interval (``table``: :func:`ftcl.results.stats.ablation_table`).
    One panel per metric with any value."""
    metrics = [m for m in ACCURACY_METRICS if m in frame and frame[m].notna().any()]
    if not metrics:
        return None
    baseline = table.attrs.get("baseline") if table is not None else None
    lines = table.set_index("row") if table is not None else None
    rows = rows_of(frame)
    palette = row_palette(rows)
    width = max(3.6, 0.95 * len(rows) + 1.6)
    ncols = 2 if len(metrics) > 2 and len(rows) > 4 else len(metrics)  # many rows: a 2-column grid
    nrows = math.ceil(len(metrics) / ncols)
    fig, axes = figure(nrows, ncols, (width * ncols, 4.6 * nrows))
    for ax in axes.flat[len(metrics):]:
        ax.set_visible(False)
    for ax, metric in zip(axes.flat, metrics):
        data = frame[["row", "seed", metric]].dropna()
        sns.stripplot(data=data, x="row", y=metric, hue="row", order=rows, hue_order=rows, palette=palette,
                      jitter=0.12, size=6, alpha=0.8, edgecolor="black", linewidth=0.5, legend=False, ax=ax)
        means = data.groupby("row")[metric].mean()
        if baseline is not None and baseline in means:
            ax.axhline(means[baseline], color="grey", linestyle="--", linewidth=1, zorder=0)
        ax.margins(y=0.3)
        ax.set_xlim(-0.5, len(rows) - 0.5)
        ax.set_xticks(range(len(rows)), rows)
        for i, row in enumerate(rows):
            if row not in means:
                ax.annotate("no result", (i, 0.02), xycoords=("data", "axes fraction"), ha="center",
                            fontsize=8, color="grey")
                continue
            ax.hlines(means[row], i - 0.3, i + 0.3, color=palette[row], linewidth=3)
            if lines is not None and row in lines.index:
                low, high = lines.loc[row, f"{metric}_ci_low"], lines.loc[row, f"{metric}_ci_high"]
                if not (math.isnan(low) or math.isnan(high)):
                    ax.errorbar(i + 0.33, means[row], yerr=[[means[row] - low], [high - means[row]]], fmt="none",
                                ecolor=palette[row], elinewidth=1.6, capsize=4)
                delta = lines.loc[row, f"{metric}_delta"]
                if not pd.isna(lines.loc[row, "reference"]) and not math.isnan(delta):
                    lo, hi = lines.loc[row, f"{metric}_delta_low"], lines.loc[row, f"{metric}_delta_high"]
                    text = f"Δ {delta:+.2f}" + ("" if math.isnan(lo) else f"\n[{lo:+.2f}, {hi:+.2f}]")
                    if lines.loc[row, f"{metric}_delta_excludes_zero"]:
                        text += " *"
                    ax.annotate(text, (i, 0.01), xycoords=("data", "axes fraction"), ha="center", va="bottom",
                                fontsize=7, color="black")
            ax.annotate(f"{means[row]:.2f}", (i, means[row]), xytext=(0, 6), textcoords="offset points",
                        ha="center", va="bottom", fontsize=8)
        ax.set_title(METRIC_LABELS[metric].split(" (")[0])
        ax.set_xlabel("ablation row")
        ax.set_ylabel(METRIC_LABELS[metric])
        ax.tick_params(axis="x", labelrotation=25 if len(rows) > 3 else 0)
    n_seeds = frame.groupby("row").size().max()
    fig.suptitle(f"Accuracy per row (points: {n_seeds} seeds; bar: mean; whisker: its 95% t interval; "
                 "Δ: paired difference to the reference [95% interval], *: excludes 0"
                 + ("; dashed: baseline mean)" if baseline else ")"))
    return save(fig, Path(path))


def _scores_of(run_dir: str | Path) -> pd.DataFrame | None:
    files = sorted((Path(run_dir) / "pretrain" / "scores").glob("epoch_*.parquet"))
    if not files:
        return None
    data = pd.concat([pd.read_parquet(f, columns=SCORE_COLUMNS) for f in files], ignore_index=True)
    return data.sort_values("iteration").drop_duplicates("iteration", keep="last")


def smooth(values: pd.Series, window: int) -> pd.Series:
    """Centred rolling mean over ``window`` iterations (shorter at the ends)."""
    return values.rolling(window, center=True, min_periods=1).mean()


def score_curves_plot(frame: pd.DataFrame, path: str | Path, smooth_fraction: float = 0.02) -> Path | None:
    """Positive and mean negative score over training, one line per row (mean over seeds, smoothed).

    Each seed's curve is smoothed over ``max(1, smooth_fraction * iterations)`` iterations; the line
    is the mean over seeds at each iteration and the band the range of the seeds.
    """
    rows = rows_of(frame)
    palette = row_palette(rows)
    curves: dict[str, pd.DataFrame] = {}
    for row in rows:
        per_seed = []
        for seed, run_dir in frame.loc[frame["row"] == row, ["seed", "run_dir"]].itertuples(index=False):
            scores = _scores_of(run_dir)
            if scores is None:
                log.warning("no score files for row %r seed %s under %s", row, seed, run_dir)
                continue
            window = max(1, int(round(smooth_fraction * len(scores))))
            per_seed.append(pd.DataFrame({
                "iteration": scores["iteration"].to_numpy(),
                "pos_mean": smooth(scores["pos_mean"], window).to_numpy(),
                "neg_mean": smooth(scores["neg_mean"], window).to_numpy(),
            }))
        if per_seed:
            curves[row] = pd.concat(per_seed).groupby("iteration").agg(["mean", "min", "max", "count"])
    if not curves:
        return None
    fig, grid = figure(1, 2, (12, 4.2), sharex=True)
    axes = grid[0]
    panels = {"pos_mean": "Positive score  q·k⁺", "neg_mean": "Mean negative score  mean(q·n)"}
    for ax, (column, title) in zip(axes, panels.items(), strict=True):
        for row, curve in curves.items():
            x = curve.index.to_numpy()
            ax.plot(x, curve[(column, "mean")], color=palette[row], linewidth=1.6, label=row)
            if curve[(column, "count")].max() > 1:
                ax.fill_between(x, curve[(column, "min")], curve[(column, "max")], color=palette[row],
                                alpha=0.18, linewidth=0)
        ax.set_title(title)
        ax.set_xlabel("training iteration")
        ax.set_ylabel("cosine similarity")
    axes[0].legend(title="row", fontsize=8, title_fontsize=9, loc="best")
    fig.suptitle(f"Score curves during pretraining (mean over seeds, smoothed over {smooth_fraction:.0%} of "
                 "the iterations; band: seed range)")
    return save(fig, Path(path))


def _last_histograms(frame: pd.DataFrame, row: str) -> tuple[pd.DataFrame, int] | None:
    """The row's histogram at its last recorded epoch, counts summed over the seeds that have it."""
    found: dict[int, list[pd.DataFrame]] = {}
    for seed, run_dir in frame.loc[frame["row"] == row, ["seed", "run_dir"]].itertuples(index=False):
        files = sorted((Path(run_dir) / "pretrain" / "scores").glob("hist_epoch_*.parquet"))
        if not files:
            log.warning("no score histograms for row %r seed %s under %s", row, seed, run_dir)
            continue
        hist = pd.read_parquet(files[-1])
        if "epoch" in hist and len(hist):
            epoch = int(hist["epoch"].iloc[0])
        else:
            epoch = int(files[-1].stem.rsplit("_", 1)[1])
        found.setdefault(epoch, []).append(hist.sort_values("bin_left").reset_index(drop=True))  # underflow first
    if not found:
        return None
    epoch = max(found)
    hists = found[epoch]
    total = hists[0][["bin_left", "bin_right", "pos_count", "neg_count"]].astype(float).copy()
    for other in hists[1:]:
        if len(other) != len(total) or not np.allclose(other["bin_left"], total["bin_left"], equal_nan=True):
            log.warning("row %r: a seed's histogram bins differ from the first seed's; it is left out", row)
            continue
        total[["pos_count", "neg_count"]] += other[["pos_count", "neg_count"]].to_numpy()
    return total, epoch


def histograms_plot(frame: pd.DataFrame, path: str | Path, max_columns: int = 4) -> Path | None:
    """Small multiples: per row, positive and negative score densities at the last recorded epoch."""
    hists = {row: h for row in rows_of(frame) if (h := _last_histograms(frame, row)) is not None}
    if not hists:
        return None
    ncols = min(max_columns, len(hists))
    nrows = math.ceil(len(hists) / ncols)
    lows, highs = [], []
    for total, _ in hists.values():
        edges = display_edges(total)
        used = (total["pos_count"] > 0).to_numpy() | (total["neg_count"] > 0).to_numpy()
        if used.any():
            lows.append(edges[:-1][used].min())
            highs.append(edges[1:][used].max())
    fig, axes = figure(nrows, ncols, (3.6 * ncols, 3.0 * nrows), sharex=True)
    for ax, (row, (total, epoch)) in zip(axes.flat, hists.items(), strict=False):
        edges = display_edges(total)
        widths = np.diff(edges)
        sides = (("neg_count", NEG_COLOR, "negatives"), ("pos_count", POS_COLOR, "positives"))
        for column, color, label in sides:
            counts = total[column].to_numpy()
            density = counts / (counts.sum() * widths) if counts.sum() > 0 else counts
            ax.stairs(density, edges, fill=True, color=color, alpha=0.35)
            ax.stairs(density, edges, color=color, linewidth=1.2, label=label + tail_label(total, column))
        ax.set_title(f"{row} · epoch {epoch + 1}", fontsize=10)
        ax.set_xlabel("score (outer bins: outside the range)")
        ax.set_ylabel("density")
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(hists):]:
        ax.set_visible(False)
    if lows:
        pad = 0.03 * (max(highs) - min(lows))
        axes[0, 0].set_xlim(min(lows) - pad, max(highs) + pad)
    fig.suptitle("Score distributions at the last recorded epoch (seeds pooled, each side normalised)")
    return save(fig, Path(path))


#: the plot files every aggregation writes (file name -> title), in display order
PLOT_FILES: dict[str, str] = {
    "accuracy.png": "Accuracy per row",
    "score_curves.png": "Score curves over training",
    "score_histograms.png": "Score distributions at the last epoch",
    "knn_curves.png": "kNN accuracy over training",
}


def make_plots(frame: pd.DataFrame, plots_dir: str | Path, table: pd.DataFrame | None = None) -> dict[str, Path]:
    """Write every aggregate plot (:data:`PLOT_FILES`; a placeholder saying so where there is no
    data); returns ``{title: path}`` in display order."""
    plots_dir = Path(plots_dir)
    references = {} if table is None else {r: ref for r, ref in zip(table["row"], table["reference"]) if ref}
    drawers = {
        "accuracy.png": lambda path: accuracy_plot(frame, path, table),
        "score_curves.png": lambda path: score_curves_plot(frame, path),
        "score_histograms.png": lambda path: histograms_plot(frame, path),
        "knn_curves.png": lambda path: knn_curves_plot(monitor_curves(frame), path, references),
    }
    made = {}
    for name, title in PLOT_FILES.items():
        path = plots_dir / name
        made[title] = drawers[name](path) or placeholder_plot(path, title, "no results with this data yet")
    return made
