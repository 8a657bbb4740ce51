"""Pos/neg score distributions (Zhu et al., ICCV 2021, Sec. 3): statistics per iteration, kept on
the training device, flushed to disk once per epoch, and plotted.

Per iteration, on the scores actually used in the loss (after any feature transform), for a batch
of B positives s+_b and B x K negatives s-_bk:
  pos_mean     = mean_b s+_b
  neg_mean     = mean_b mean_k s-_bk
  neg_var      = mean_b var_k s-_bk                (the spread of one sample's negatives)
  exp_pos_mean = mean_b exp(s+_b / tau)
  exp_neg_mean = mean_b mean_k exp(s-_bk / tau)
  pos_outside  = share of the s+_b outside [-1, 1]
  neg_outside  = share of the s-_bk outside [-1, 1]
Scores leave [-1, 1] when a transform leaves the unit sphere: positive extrapolation without
renormalisation gives q'.k' = s (l^2 + (1 - l)^2) + 2 l (1 - l), e.g. -2 for s = 0.4, l = 2, and
|q'| up to sqrt(5), so negatives q'.n' can exceed 1.
Every ``histogram_every`` iterations of the chosen epochs, the raw pos and neg scores are added to
fixed-bin histograms on ``scores.range`` (:func:`histogram_range`) with one underflow and one
overflow bin, so no score is dropped. Nothing leaves the device until ``flush``: one copy per epoch.

Cost. The positive statistics use the whole batch (B numbers). The negative statistics and the
negative histogram use the first ``rows`` rows of the B x K matrix only (config ``scores.rows``,
default 64; ``null`` = all rows). The batch order is random, so this is an unbiased estimate of the
batch mean over ``rows x K`` scores (262144 at K = 4096), and it keeps the per-step cost of
recording a small fixed fraction of the step instead of two extra passes over B x K. The variance
is computed as E[s^2] - E[s]^2 in one vectorised pass (scores are cosines in [-1, 1], so float32
cancellation error stays near 1e-7, far below the variances the paper plots, ~1e-3).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from ftcl.config.types import FTSide, Scores
from ftcl.files import replacing

STAT_COLUMNS = ("loss", "pos_mean", "neg_mean", "neg_var", "exp_pos_mean", "exp_neg_mean", "pos_outside",
                "neg_outside")
#: the histogram range of scores that stay on the unit sphere (cosines)
UNIT_RANGE = (-1.0, 1.0)
#: the default range when positives are extrapolated without renormalisation
EXTRAPOLATED_RANGE = (-3.0, 2.0)


def histogram_range(range_: Sequence[float] | None, positive: FTSide) -> tuple[float, float]:
    """``scores.range``, or by default [-1, 1], widened to [-3, 2] when ``ft.positive`` extrapolates
    without renormalising (the scores the loss uses then leave [-1, 1]; see the module docstring)."""
    if range_ is not None:
        return float(range_[0]), float(range_[1])
    if positive.mode == "extrapolate" and not positive.renormalize:
        return EXTRAPOLATED_RANGE
    return UNIT_RANGE


def score_statistics(pos: Tensor, neg: Tensor | None, temperature: float, rows: int | None = None) -> Tensor:
    """The seven statistics above as one device tensor
    ``[pos_mean, neg_mean, neg_var, exp_pos, exp_neg, pos_outside, neg_outside]``.

    ``neg=None`` (methods without negatives) gives NaN for the negative statistics. ``rows`` limits
    the negative statistics to the first ``rows`` rows of ``neg`` (None = all). ``neg_var`` is the
    unbiased per-row variance (ddof 1), averaged over rows.
    """
    pos = pos.detach().float()
    exp_pos = torch.exp(pos / temperature).mean()
    pos_outside = (pos.abs() > 1).float().mean()
    if neg is None:
        nan = torch.full((), float("nan"), device=pos.device)
        return torch.stack([pos.mean(), nan, nan, exp_pos, nan, pos_outside, nan])
    neg = negative_rows(neg, rows).float()
    k = neg.shape[1]
    row_mean = neg.mean(dim=1)
    row_var = (neg.square().mean(dim=1) - row_mean.square()).clamp_min(0) * (k / max(k - 1, 1))
    return torch.stack([pos.mean(), row_mean.mean(), row_var.mean(), exp_pos,
                        torch.exp(neg * (1.0 / temperature)).mean(), pos_outside, (neg.abs() > 1).float().mean()])


def histogram_with_tails(values: Tensor, bins: int, low: float, high: float) -> Tensor:
    """Counts of ``values`` in ``bins`` equal bins on [low, high], with one underflow bin (< low) first
    and one overflow bin (> high) last: ``bins + 2`` counts, so every value is counted."""
    values = values.detach().float().flatten()
    inside = torch.histc(values, bins, low, high)
    return torch.cat([(values < low).sum().float().view(1), inside, (values > high).sum().float().view(1)])


def negative_rows(neg: Tensor, rows: int | None) -> Tensor:
    """The first ``rows`` rows of the detached B x K negative scores (all of them when ``rows`` is None)."""
    neg = neg.detach()
    return neg if rows is None or rows >= neg.shape[0] else neg[:rows]


def resolve_epochs(epochs: Sequence[int], total: int) -> set[int]:
    """Map negative epoch indices (-1 = last) onto ``range(total)``."""
    return {e % total for e in epochs if -total <= e < total}


class ScoreRecorder:
    """Accumulates per-iteration statistics and histograms on ``device`` for one epoch at a time."""

    def __init__(self, iters_per_epoch: int, total_epochs: int, histogram_epochs: Sequence[int],
                 histogram_every: int, bins: int, device: torch.device, rows: int | None = None,
                 hist_range: tuple[float, float] = UNIT_RANGE):
        self.iters, self.rows = iters_per_epoch, rows
        self.hist_epochs = resolve_epochs(histogram_epochs, total_epochs)
        self.every, self.bins, self.device = histogram_every, bins, device
        self.hist_range = (float(hist_range[0]), float(hist_range[1]))
        self._stats = torch.full((iters_per_epoch, len(STAT_COLUMNS)), float("nan"), device=device)
        self._pos_hist = torch.zeros(bins + 2, device=device)
        self._neg_hist = torch.zeros(bins + 2, device=device)
        self._n = 0

    @classmethod
    def from_section(cls, scores: Scores, iters_per_epoch: int, total_epochs: int, device: torch.device,
                     hist_range: tuple[float, float]) -> ScoreRecorder:
        """The recorder the run config's ``scores`` section describes (``hist_range``:
        :func:`histogram_range`)."""
        return cls(iters_per_epoch, total_epochs, scores.histogram_epochs, scores.histogram_every, scores.bins,
                   device, rows=scores.rows, hist_range=hist_range)

    def record(self, i: int, loss: Tensor, pos: Tensor, neg: Tensor | None, temperature: float) -> None:
        """Store iteration ``i``'s statistics (no host synchronisation)."""
        with torch.no_grad():
            self._stats[i, 0] = loss.detach().float()
            self._stats[i, 1:] = score_statistics(pos, neg, temperature, self.rows)
            self._n = max(self._n, i + 1)
            if self._epoch in self.hist_epochs and i % self.every == 0:
                self._pos_hist += histogram_with_tails(pos, self.bins, *self.hist_range)
                if neg is not None:
                    self._neg_hist += histogram_with_tails(negative_rows(neg, self.rows), self.bins, *self.hist_range)

    def start_epoch(self, epoch: int) -> None:
        self._epoch = epoch
        self._stats.fill_(float("nan"))
        self._pos_hist.zero_()
        self._neg_hist.zero_()
        self._n = 0

    def flush(self, epoch: int, first_iteration: int, lrs: Sequence[float], out_dir: Path) -> dict[str, float]:
        """Write ``epoch_XXXX.parquet`` (and ``hist_epoch_XXXX.parquet``); return the epoch means."""
        out_dir.mkdir(parents=True, exist_ok=True)
        stats = self._stats[: self._n].cpu().numpy()
        frame = pd.DataFrame(stats, columns=list(STAT_COLUMNS))
        frame.insert(0, "iteration", range(first_iteration, first_iteration + self._n))
        frame.insert(0, "epoch", epoch)
        frame["lr"] = list(lrs)[: self._n]
        _atomic_parquet(frame, out_dir / f"epoch_{epoch:04d}.parquet")
        if epoch in self.hist_epochs:
            low, high = self.hist_range
            edges = [-math.inf, *torch.linspace(low, high, self.bins + 1).tolist(), math.inf]
            hist = pd.DataFrame({
                "epoch": epoch, "bin_left": edges[:-1], "bin_right": edges[1:],
                "pos_count": self._pos_hist.cpu().numpy(), "neg_count": self._neg_hist.cpu().numpy(),
            })
            _atomic_parquet(hist, out_dir / f"hist_epoch_{epoch:04d}.parquet")
        return {c: float(frame[c].mean()) for c in STAT_COLUMNS}


def _atomic_parquet(frame: pd.DataFrame, path: Path) -> None:
    with replacing(path) as tmp:
        frame.to_parquet(tmp, index=False)


def load_scores(score_dir: str | Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """All per-iteration statistics and all histograms of a run, sorted by iteration / epoch."""
    score_dir = Path(score_dir)
    stats = [pd.read_parquet(p) for p in sorted(score_dir.glob("epoch_*.parquet"))]
    hists = [pd.read_parquet(p) for p in sorted(score_dir.glob("hist_epoch_*.parquet"))]
    return (pd.concat(stats, ignore_index=True) if stats else pd.DataFrame(columns=["epoch", "iteration"]),
            pd.concat(hists, ignore_index=True) if hists else pd.DataFrame(columns=["epoch"]))


def plot_score_curves(stats: pd.DataFrame, path: Path, title: str = "") -> Path:
    """The paper's figure: batch-averaged pos and neg scores (and neg variance) over iterations."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    window = max(1, len(stats) // 100)
    x = stats["iteration"]
    for ax, cols, label in (
        (axes[0], ["pos_mean", "neg_mean"], "cosine score"),
        (axes[1], ["neg_var"], "variance of negative scores"),
        (axes[2], ["loss"], "InfoNCE loss"),
    ):
        for col in cols:
            ax.plot(x, stats[col].rolling(window, min_periods=1).mean(), label=col)
        ax.set_xlabel("training iteration")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        if len(cols) > 1:
            ax.legend()
    epoch_starts = stats.groupby("epoch")["iteration"].min()
    for it in epoch_starts.iloc[1:]:
        axes[0].axvline(it, color="grey", lw=0.5, alpha=0.5)
    fig.suptitle(title or "score distribution over training")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def display_edges(hist: pd.DataFrame) -> np.ndarray:
    """Bin edges of a histogram frame (sorted by ``bin_left``) for drawing: the underflow and overflow
    bins, whose outer edges are infinite, are drawn one bin width beyond the range."""
    left, right = hist["bin_left"].to_numpy(float), hist["bin_right"].to_numpy(float)
    finite = np.isfinite(left) & np.isfinite(right)
    width = float((right[finite] - left[finite]).min()) if finite.any() else 1.0
    edges = np.append(left, right[-1])
    if not np.isfinite(edges[0]):
        edges[0] = edges[1] - width
    if not np.isfinite(edges[-1]):
        edges[-1] = edges[-2] + width
    return edges


def tail_shares(hist: pd.DataFrame, column: str) -> tuple[float, float]:
    """Shares of ``column``'s counts in the underflow and overflow bins (0 when there are none)."""
    total = float(hist[column].sum())
    if total <= 0:
        return 0.0, 0.0
    under = hist.loc[~np.isfinite(hist["bin_left"].to_numpy(float)), column].sum()
    over = hist.loc[~np.isfinite(hist["bin_right"].to_numpy(float)), column].sum()
    return float(under) / total, float(over) / total


def tail_label(hist: pd.DataFrame, column: str) -> str:
    """``" (12.5% < -3, 0.1% > 2)"`` for the side's scores outside the histogram range, else ``""``."""
    under, over = tail_shares(hist, column)
    finite = hist[np.isfinite(hist["bin_left"].to_numpy(float)) & np.isfinite(hist["bin_right"].to_numpy(float))]
    parts = []
    if under > 0:
        parts.append(f"{100 * under:.1f}% < {finite['bin_left'].min():g}")
    if over > 0:
        parts.append(f"{100 * over:.1f}% > {finite['bin_right'].max():g}")
    return f" ({', '.join(parts)})" if parts else ""


def plot_histograms(hists: pd.DataFrame, path: Path, epochs: Sequence[int], title: str = "") -> Path | None:
    """Pos and neg score histograms (normalised to densities) for the chosen epochs; scores outside
    the histogram range are drawn as the outermost (hatched) bins and their shares named in the legend."""
    if hists.empty:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    available = sorted(hists["epoch"].unique())
    chosen = sorted({available[e] if e < 0 else e for e in epochs if -len(available) <= e} & set(available))
    chosen = chosen or available[-1:]
    fig, axes = plt.subplots(1, len(chosen), figsize=(4.2 * len(chosen), 3.4), squeeze=False)
    for ax, epoch in zip(axes[0], chosen, strict=True):
        h = hists[hists["epoch"] == epoch].sort_values("bin_left")
        edges = display_edges(h)
        widths = np.diff(edges)
        tails = ~(np.isfinite(h["bin_left"].to_numpy(float)) & np.isfinite(h["bin_right"].to_numpy(float)))
        for col, color, name in (("pos_count", "tab:blue", "positive"), ("neg_count", "tab:red", "negative")):
            total = h[col].sum()
            if total > 0:
                density = h[col].to_numpy(float) / (total * widths)
                ax.bar(edges[:-1], density, width=widths, align="edge", alpha=0.55, color=color,
                       hatch=None, label=name + tail_label(h, col))
                if tails.any():
                    ax.bar(edges[:-1][tails], density[tails], width=widths[tails], align="edge", fill=False,
                           hatch="///", edgecolor=color)
        ax.set_title(f"epoch {epoch + 1}")
        ax.set_xlabel("score (cosine; outer bins: outside the range)")
        ax.set_ylabel("density")
        ax.legend(fontsize=8)
    fig.suptitle(title or "pos/neg score distribution")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
