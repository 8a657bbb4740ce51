"""What every aggregate figure shares: a pyplot-free figure, one colour per row in every plot, saving,
and the placeholder a declared plot gets when there is no data for it yet."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure

DPI = 130


def row_palette(rows: Sequence[str]) -> dict[str, tuple[float, float, float]]:
    """One colour per row, the same in every plot."""
    colors = sns.color_palette("tab10" if len(rows) <= 10 else "husl", len(rows))
    return dict(zip(rows, colors, strict=True))


def rows_of(frame: pd.DataFrame) -> list[str]:
    return list(dict.fromkeys(frame["row"]))


def figure(nrows: int, ncols: int, figsize: tuple[float, float], **kwargs) -> tuple[Figure, np.ndarray]:
    """A pyplot-free figure (rendered by the Agg canvas; no global backend state) with a grid of axes."""
    with sns.axes_style("whitegrid"):
        fig = Figure(figsize=figsize, layout="constrained")
        axes = fig.subplots(nrows, ncols, squeeze=False, **kwargs)
    return fig, axes


def save(fig: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    return path



def placeholder_plot(path: Path, title: str, reason: str) -> Path:
    """A small figure saying why a plot has no data (the pipeline declares every plot as an output)."""
    fig, axes = figure(1, 1, (6, 1.6))
    axes[0, 0].axis("off")
    axes[0, 0].text(0.5, 0.5, f"{title}: {reason}", ha="center", va="center", fontsize=10, color="grey")
    return save(fig, path)
