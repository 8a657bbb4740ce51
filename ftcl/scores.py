"""Pos/neg score distributions (Zhu et al., ICCV 2021, Sec. 3): statistics per iteration, kept on
the training device, flushed to disk once per epoch, and plotted.

Per iteration, on the scores actually used in the loss (after any feature transform), for a batch
of B positives s+_b and B x K negatives s-_bk:
  pos_mean     = mean_b s+_b
  neg_mean     = mean_b mean_k s-_bk
  neg_var      = mean_b var_k s-_bk                (the spread of one sample's negatives)
  exp_pos_mean = mean_b exp(s+_b / tau)
  exp_neg_mean = mean_b mean_k exp(s-_bk / tau)
Every ``histogram_every`` iterations of the chosen epochs, the raw pos and neg scores are added to
fixed-bin histograms on [-1, 1]. Nothing leaves the device until ``flush``: one copy per epoch.

Cost. The positive statistics use the whole batch (B numbers). The negative statistics and the
negative histogram use the first ``rows`` rows of the B x K matrix only (config ``scores.rows``,
default 64; ``null`` = all rows). The batch order is random, so this is an unbiased estimate of the
batch mean over ``rows x K`` scores (262144 at K = 4096), and it keeps the per-step cost of
recording a small fixed fraction of the step instead of two extra passes over B x K. The variance
is computed as E[s^2] - E[s]^2 in one vectorised pass (scores are cosines in [-1, 1], so float32
cancellation error stays near 1e-7, far below the variances the paper plots, ~1e-3).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pandas as pd
import torch
from torch import Tensor

STAT_COLUMNS = ("loss", "pos_mean", "neg_mean", "neg_var", "exp_pos_mean", "exp_neg_mean")


def score_statistics(pos: Tensor, neg: Tensor | None, temperature: float, rows: int | None = None) -> Tensor:
    """The five statistics above as one device tensor ``[pos_mean, neg_mean, neg_var, exp_pos, exp_neg]``.

    ``neg=None`` (methods without negatives) gives NaN for the negative statistics. ``rows`` limits
    the negative statistics to the first ``rows`` rows of ``neg`` (None = all). ``neg_var`` is the
    unbiased per-row variance (ddof 1), averaged over rows.
    """
    pos = pos.detach().float()
    exp_pos = torch.exp(pos / temperature).mean()
    if neg is None:
        nan = torch.full((), float("nan"), device=pos.device)
        return torch.stack([pos.mean(), nan, nan, exp_pos, nan])
    neg = negative_rows(neg, rows).float()
    k = neg.shape[1]
    row_mean = neg.mean(dim=1)
    row_var = (neg.square().mean(dim=1) - row_mean.square()).clamp_min(0) * (k / max(k - 1, 1))
    return torch.stack([pos.mean(), row_mean.mean(), row_var.mean(), exp_pos,
                        torch.exp(neg * (1.0 / temperature)).mean()])


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
                 histogram_every: int, bins: int, device: torch.device, rows: int | None = None):
        self.iters, self.rows = iters_per_epoch, rows
        self.hist_epochs = resolve_epochs(histogram_epochs, total_epochs)
        self.every, self.bins, self.device = histogram_every, bins, device
        self._stats = torch.full((iters_per_epoch, len(STAT_COLUMNS)), float("nan"), device=device)
        self._pos_hist = torch.zeros(bins, device=device)
        self._neg_hist = torch.zeros(bins, device=device)
        self._n = 0

    @classmethod
    def from_config(cls, scores_cfg: dict, iters_per_epoch: int, total_epochs: int,
                    device: torch.device) -> ScoreRecorder:
        """The recorder a run's ``scores`` config section describes."""
        return cls(iters_per_epoch, total_epochs, scores_cfg["histogram_epochs"], scores_cfg["histogram_every"],
                   scores_cfg["bins"], device, rows=scores_cfg.get("rows"))

    def record(self, i: int, loss: Tensor, pos: Tensor, neg: Tensor | None, temperature: float) -> None:
        """Store iteration ``i``'s statistics (no host synchronisation)."""
        with torch.no_grad():
            self._stats[i, 0] = loss.detach().float()
            self._stats[i, 1:] = score_statistics(pos, neg, temperature, self.rows)
            self._n = max(self._n, i + 1)
            if self._epoch in self.hist_epochs and i % self.every == 0:
                self._pos_hist += torch.histc(pos.detach().float(), self.bins, -1.0, 1.0)
                if neg is not None:
                    self._neg_hist += torch.histc(negative_rows(neg, self.rows).float(), self.bins, -1.0, 1.0)

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
            edges = torch.linspace(-1, 1, self.bins + 1)
            hist = pd.DataFrame({
                "epoch": epoch, "bin_left": edges[:-1].numpy(), "bin_right": edges[1:].numpy(),
                "pos_count": self._pos_hist.cpu().numpy(), "neg_count": self._neg_hist.cpu().numpy(),
            })
            _atomic_parquet(hist, out_dir / f"hist_epoch_{epoch:04d}.parquet")
        return {c: float(frame[c].mean()) for c in STAT_COLUMNS}


def _atomic_parquet(frame: pd.DataFrame, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    frame.to_parquet(tmp, index=False)
    tmp.replace(path)


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


def plot_histograms(hists: pd.DataFrame, path: Path, epochs: Sequence[int], title: str = "") -> Path | None:
    """Pos and neg score histograms (normalised to densities) for the chosen epochs."""
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
        h = hists[hists["epoch"] == epoch]
        centers = (h["bin_left"] + h["bin_right"]) / 2
        width = float((h["bin_right"] - h["bin_left"]).iloc[0])
        for col, color, name in (("pos_count", "tab:blue", "positive"), ("neg_count", "tab:red", "negative")):
            total = h[col].sum()
            if total > 0:
                ax.bar(centers, h[col] / (total * width), width=width, alpha=0.55, color=color, label=name)
        ax.set_title(f"epoch {epoch + 1}")
        ax.set_xlabel("cosine score")
        ax.set_ylabel("density")
        ax.legend()
    fig.suptitle(title or "pos/neg score distribution")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
