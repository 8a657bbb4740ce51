"""The table maths, pure (DataFrames and numbers in, DataFrames out; no files, no MLflow).

For each row and metric: the mean over seeds, the sample standard deviation (ddof 1) and the 95 %
confidence interval of the mean (Student t). For each row against its reference row (the baseline,
or the row it names with ``compare_to``), the difference with a 95 % confidence interval:

* **paired** (the default): runs of two rows with the same seed share their initialisation and data
  order, so the difference is taken seed by seed, d_s = x_row,s - x_ref,s, over the seeds both rows
  have; Δ = mean_s d_s and its interval Δ ± t(0.975, n-1) sd(d) / sqrt(n) (a paired t interval);
* **Welch** when the rows share fewer than two seeds but each has at least two: the difference of
  the means with Welch's unequal-variance t interval (Welch-Satterthwaite degrees of freedom);
* **none** otherwise (n < 2): Δ is the difference of the means and no interval is given.

``excludes_zero`` is True when the whole interval lies on one side of 0: a difference that cannot
be explained by seed-to-seed noise at the 95 % level. A difference inside its interval is not a
finding, and the tables say so.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import stats as sps

CONFIDENCE = 0.95
PAIRED, WELCH, NONE = "paired t", "Welch t", "n<2"


def t_quantile(df: float, confidence: float = CONFIDENCE) -> float:
    """The two-sided Student t quantile t((1 + confidence) / 2, df)."""
    return float(sps.t.ppf((1 + confidence) / 2, df))


def mean_interval(values: Sequence[float], confidence: float = CONFIDENCE) -> tuple[float, float, float]:
    """``(mean, low, high)``: the mean and its Student t interval (NaN bounds for fewer than 2 values)."""
    x = np.asarray([v for v in values if not math.isnan(v)], dtype=float)
    if x.size == 0:
        return math.nan, math.nan, math.nan
    mean = float(x.mean())
    if x.size < 2:
        return mean, math.nan, math.nan
    half = t_quantile(x.size - 1, confidence) * float(x.std(ddof=1)) / math.sqrt(x.size)
    return mean, mean - half, mean + half


def ratio_interval(ratios: Sequence[float], confidence: float = CONFIDENCE) -> tuple[float, float, float]:
    """``(ratio, low, high)`` of paired timing ratios (benchmarks): the geometric mean of the per-pair
    ratios and its Student t interval, computed on the log ratios and mapped back with exp."""
    mean, low, high = mean_interval([math.log(r) for r in ratios], confidence)
    return math.exp(mean), math.exp(low), math.exp(high)


def goal_verdict(low: float, high: float, goal: float) -> str:
    """A "ratio >= goal" benchmark goal against a ratio's interval ``[low, high]``: "met" when the whole
    interval clears it, "not met" when the whole interval falls short, else "undecided"."""
    return "met" if low >= goal else "not met" if high < goal else "undecided"


@dataclass(frozen=True)
class Difference:
    """A row's difference to its reference for one metric (module docstring)."""

    delta: float
    low: float
    high: float
    n: int  # pairs (paired), or the smaller group size (Welch / none)
    method: str

    @property
    def excludes_zero(self) -> bool:
        return not (math.isnan(self.low) or math.isnan(self.high)) and (self.low > 0 or self.high < 0)


def difference(row: Mapping[object, float], ref: Mapping[object, float],
               confidence: float = CONFIDENCE) -> Difference:
    """The difference of ``row`` to ``ref`` (seed -> value; NaN values are missing results)."""
    row = {s: float(v) for s, v in row.items() if not math.isnan(v)}
    ref = {s: float(v) for s, v in ref.items() if not math.isnan(v)}
    if not row or not ref:
        return Difference(math.nan, math.nan, math.nan, 0, NONE)
    shared = [s for s in row if s in ref]
    if len(shared) >= 2:
        d = np.array([row[s] - ref[s] for s in shared])
        mean, low, high = mean_interval(d, confidence)
        return Difference(mean, low, high, len(shared), PAIRED)
    a, b = np.array(list(row.values())), np.array(list(ref.values()))
    delta = float(a.mean() - b.mean())
    if a.size < 2 or b.size < 2:
        return Difference(delta, math.nan, math.nan, min(a.size, b.size), NONE)
    va, vb = a.var(ddof=1) / a.size, b.var(ddof=1) / b.size
    se = math.sqrt(va + vb)
    if se == 0:
        return Difference(delta, delta, delta, min(a.size, b.size), WELCH)
    dof = (va + vb) ** 2 / (va**2 / (a.size - 1) + vb**2 / (b.size - 1))
    half = t_quantile(dof, confidence) * se
    return Difference(delta, delta - half, delta + half, min(a.size, b.size), WELCH)


def ablation_table(df: pd.DataFrame, baseline: str | None, metrics: Sequence[str],
                   references: Mapping[str, str] | None = None, groups: Mapping[str, str] | None = None,
                   confidence: float = CONFIDENCE) -> pd.DataFrame:
    """One line per row (in the order of ``df``; ``df`` has ``row``, ``seed``, the metric columns and
    ``protocol``) with, for each metric ``m``:

    ``m_mean``, ``m_std`` (ddof 1; NaN for one seed), ``m_n`` (seeds with a value), ``m_ci_low`` /
    ``m_ci_high`` (the mean's interval), and against the reference row: ``m_delta``,
    ``m_delta_low``, ``m_delta_high``, ``m_delta_n``, ``m_delta_method`` and ``m_delta_excludes_zero``
    (see :func:`difference`); plus ``n_seeds``, ``reference`` (``references[row]``, else
    ``baseline``; the baseline has none), ``group`` (a grid row's hand-written row) and ``protocol``.
    """
    order = list(dict.fromkeys(df["row"]))
    references = dict(references or {})
    groups = dict(groups or {})
    table = pd.DataFrame({"row": order})
    table["group"] = [groups.get(r, r) for r in order]
    table["n_seeds"] = df.groupby("row", sort=False).size().reindex(order).to_numpy()
    table["reference"] = [references.get(r, baseline if r != baseline else None) for r in order]
    for metric in metrics:
        values = df[metric].astype(float) if metric in df else pd.Series(math.nan, index=df.index)
        by_row = {r: dict(zip(df.loc[df["row"] == r, "seed"], values[df["row"] == r])) for r in order}
        stats_ = [mean_interval(list(by_row[r].values()), confidence) for r in order]
        table[f"{metric}_mean"] = [s[0] for s in stats_]
        table[f"{metric}_std"] = [_std(list(by_row[r].values())) for r in order]
        table[f"{metric}_n"] = [sum(not math.isnan(v) for v in by_row[r].values()) for r in order]
        table[f"{metric}_ci_low"] = [s[1] for s in stats_]
        table[f"{metric}_ci_high"] = [s[2] for s in stats_]
        diffs = [difference(by_row[r], by_row[ref], confidence) if ref in by_row else None
                 for r, ref in zip(order, table["reference"])]
        nan = Difference(math.nan, math.nan, math.nan, 0, "")
        table[f"{metric}_delta"] = [(d or nan).delta for d in diffs]
        table[f"{metric}_delta_low"] = [(d or nan).low for d in diffs]
        table[f"{metric}_delta_high"] = [(d or nan).high for d in diffs]
        table[f"{metric}_delta_n"] = [(d or nan).n for d in diffs]
        table[f"{metric}_delta_method"] = [(d or nan).method for d in diffs]
        table[f"{metric}_delta_excludes_zero"] = [(d or nan).excludes_zero for d in diffs]
    protocols = df.groupby("row", sort=False)["protocol"].agg(lambda s: " | ".join(dict.fromkeys(p for p in s if p)))
    table["protocol"] = protocols.reindex(order).fillna("").to_numpy()
    table.attrs["baseline"] = baseline
    table.attrs["confidence"] = confidence
    return table


def _std(values: Sequence[float]) -> float:
    x = [v for v in values if not math.isnan(v)]
    return float(np.std(x, ddof=1)) if len(x) > 1 else math.nan


def against(df: pd.DataFrame, reference: str, metrics: Sequence[str],
            confidence: float = CONFIDENCE) -> pd.DataFrame:
    """Every row's paired difference to one ``reference`` row (e.g. the random-init floor): one line
    per row and metric with ``delta``, ``low``, ``high``, ``n``, ``method``, ``excludes_zero``."""
    lines = []
    ref = df[df["row"] == reference]
    for row in dict.fromkeys(df["row"]):
        if row == reference:
            continue
        mine = df[df["row"] == row]
        for metric in metrics:
            if metric not in df or not mine[metric].notna().any() or not ref[metric].notna().any():
                continue
            d = difference(dict(zip(mine["seed"], mine[metric].astype(float))),
                           dict(zip(ref["seed"], ref[metric].astype(float))), confidence)
            lines.append({"row": row, "metric": metric, "reference": reference, "delta": d.delta, "low": d.low,
                          "high": d.high, "n": d.n, "method": d.method, "excludes_zero": d.excludes_zero})
    return pd.DataFrame(lines, columns=["row", "metric", "reference", "delta", "low", "high", "n", "method",
                                        "excludes_zero"])


def paper_table(df: pd.DataFrame, published: Mapping[str, Mapping[str, float]]) -> pd.DataFrame:
    """Rows with published numbers (``published[row] = {metric: value}``): one line per row x metric
    with ``ours_mean``, ``ours_std``, ``n_seeds`` (seeds with a value), ``published`` and
    ``difference`` (ours_mean minus published). A metric with no result column gives NaN for ours."""
    lines = []
    for row, numbers in published.items():
        for metric, value in numbers.items():
            ours = df.loc[df["row"] == row, metric].dropna() if metric in df else pd.Series(dtype=float)
            mean = float(ours.mean()) if len(ours) else math.nan
            lines.append({"row": row, "metric": metric, "ours_mean": mean,
                          "ours_std": float(ours.std(ddof=1)) if len(ours) > 1 else math.nan,
                          "n_seeds": len(ours), "published": float(value), "difference": mean - float(value)})
    return pd.DataFrame(lines, columns=["row", "metric", "ours_mean", "ours_std", "n_seeds", "published",
                                        "difference"])
