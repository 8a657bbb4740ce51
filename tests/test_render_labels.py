"""The linear probe's column names the epoch it reports (MoCo's main_lincls.py: the best; else the last)."""

import pandas as pd

from ftcl.results.render import display_ablation, display_paper, metric_label


def _table(protocols: list[str]) -> pd.DataFrame:
    n = len(protocols)
    table = pd.DataFrame({"row": [f"r{i}" for i in range(n)], "group": [f"r{i}" for i in range(n)],
                          "n_seeds": [1] * n, "reference": [None] * n, "protocol": protocols,
                          "linear_top1_mean": [50.0] * n, "linear_top1_std": [float("nan")] * n,
                          "linear_top1_n": [1] * n})
    table.attrs["baseline"] = "r0"
    return table


def test_the_linear_column_names_the_reported_epoch_when_rows_agree():
    best = "linear: epochs=100, report=best; knn: k=200"
    assert "Linear top-1, best epoch (%)" in display_ablation(_table([best, best]))
    assert "Linear top-1, last epoch (%)" in display_ablation(_table(["linear: report=last"]))
    mixed = display_ablation(_table([best, "linear: epochs=100, report=last; knn: k=200"]))
    assert "Linear top-1 (%)" in mixed and "Protocol" in mixed  # each row's protocol says which
    assert metric_label("knn_top1", [best]) == "kNN top-1 (%)"


def test_the_paper_table_names_the_reported_epoch():
    paper = pd.DataFrame({"row": ["r0"], "metric": ["linear_top1"], "ours_mean": [60.0], "ours_std": [0.1],
                          "n_seeds": [1], "published": [60.6], "difference": [-0.6]})
    shown = display_paper(paper, protocols=["linear: report=best"])
    assert shown["Metric"].tolist() == ["Linear top-1, best epoch (%)"]
