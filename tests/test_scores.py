"""Score statistics: reduced on the device to the paper's five numbers, flushed per epoch."""

import pandas as pd
import pytest
import torch

from ftcl import config
from ftcl.scores import ScoreRecorder, load_scores, plot_histograms, plot_score_curves, score_statistics


def test_statistics_match_numpy():
    pos = torch.tensor([0.9, 0.5])
    neg = torch.tensor([[0.1, 0.3, -0.2], [0.0, 0.4, 0.2]])
    t = 0.2
    stats = score_statistics(pos, neg, t).tolist()
    n = neg.numpy()
    assert stats[0] == pytest.approx(0.7)
    assert stats[1] == pytest.approx(n.mean())
    assert stats[2] == pytest.approx(n.var(axis=1, ddof=1).mean(), rel=1e-5)
    assert stats[3] == pytest.approx(torch.exp(pos / t).mean().item(), rel=1e-6)
    assert stats[4] == pytest.approx(torch.exp(neg / t).mean().item(), rel=1e-6)


def test_variance_is_accurate_when_scores_crowd_together():
    # A collapsing encoder: negatives near 0.9 with a spread of 1e-3 (variance 1e-6); the one-pass
    # E[s^2] - E[s]^2 in float32 must still match a float64 reference to a few percent.
    gen = torch.Generator().manual_seed(0)
    neg = 0.9 + 1e-3 * torch.randn(64, 4096, generator=gen)
    stats = score_statistics(torch.ones(64), neg, 0.2).tolist()
    ref = neg.double().var(dim=1).mean().item()
    assert stats[2] == pytest.approx(ref, rel=0.05)


def test_rows_limits_negative_statistics_to_the_first_rows_only():
    gen = torch.Generator().manual_seed(1)
    pos, neg = torch.rand(8, generator=gen), torch.rand(8, 50, generator=gen) * 2 - 1
    neg[4:] += 5.0  # rows past the sample would move every negative statistic if they were read
    sub = score_statistics(pos, neg, 0.2, rows=4)
    assert torch.allclose(sub, score_statistics(pos, neg[:4], 0.2))
    assert sub[0].item() == pytest.approx(pos.mean().item())  # positives always use the whole batch
    assert torch.allclose(score_statistics(pos, neg, 0.2, rows=None), score_statistics(pos, neg, 0.2, rows=99))


def test_methods_without_negatives_give_nan_negative_statistics():
    stats = score_statistics(torch.tensor([0.5, 0.7]), None, 0.2)
    assert stats[0].item() == pytest.approx(0.6) and torch.isnan(stats[1])


def test_recorder_writes_one_row_per_iteration_and_histograms(tmp_path):
    rec = ScoreRecorder(iters_per_epoch=4, total_epochs=2, histogram_epochs=[-1], histogram_every=2, bins=10,
                        device=torch.device("cpu"))
    for epoch in range(2):
        rec.start_epoch(epoch)
        for i in range(4):
            rec.record(i, torch.tensor(1.0 + i), torch.full((3,), 0.5), torch.full((3, 5), -0.15), 0.2)
        means = rec.flush(epoch, epoch * 4, [0.1] * 4, tmp_path)
    assert means["pos_mean"] == pytest.approx(0.5) and means["loss"] == pytest.approx(2.5)
    stats, hists = load_scores(tmp_path)
    assert list(stats["iteration"]) == list(range(8))
    assert set(hists["epoch"]) == {1}  # only the last epoch was histogrammed
    assert hists["pos_count"].sum() == 6 and hists["neg_count"].sum() == 30  # iterations 0 and 2
    assert hists.loc[hists["pos_count"] > 0, "bin_left"].item() == pytest.approx(0.4)
    assert plot_score_curves(stats, tmp_path / "c.png").stat().st_size > 10_000
    assert plot_histograms(hists, tmp_path / "h.png", [-1]).stat().st_size > 5_000
    assert isinstance(stats, pd.DataFrame)


def test_recorder_histograms_only_the_sampled_rows(tmp_path):
    rec = ScoreRecorder(iters_per_epoch=1, total_epochs=1, histogram_epochs=[0], histogram_every=1, bins=4,
                        device=torch.device("cpu"), rows=2)
    rec.start_epoch(0)
    rec.record(0, torch.tensor(1.0), torch.full((6,), 0.5), torch.full((6, 10), -0.5), 0.2)
    rec.flush(0, 0, [0.1], tmp_path)
    _, hists = load_scores(tmp_path)
    assert hists["pos_count"].sum() == 6 and hists["neg_count"].sum() == 20


def test_extrapolated_positives_below_minus_one_are_histogrammed_and_counted(tmp_path):
    from ftcl.scores import EXTRAPOLATED_RANGE, histogram_range
    from ftcl.transforms.ft import extrapolate_positives

    # unit q, k with cosine 0.4 and lambda = 2 (b = 1): q'.k' = 0.4 * 5 - 4 = -2
    q = torch.tensor([[1.0, 0.0]]).repeat(4, 1)
    k = torch.tensor([[0.4, (1 - 0.16) ** 0.5]]).repeat(4, 1)
    qt, kt = extrapolate_positives(q, k, 1.0)
    pos = (qt * kt).sum(1)
    assert torch.allclose(pos, torch.full((4,), -2.0), atol=1e-6)
    pos = torch.cat([pos, torch.tensor([0.5, 0.9, -0.5, 3.5])])  # one above every range too
    neg = torch.zeros(8, 3)

    positive = config.resolve(overrides={"ft.positive.mode": "extrapolate"}).ft.positive
    assert histogram_range(None, positive) == EXTRAPOLATED_RANGE
    renormalized = config.resolve(overrides={"ft.positive.mode": "extrapolate", "ft.positive.renormalize": True})
    assert histogram_range(None, renormalized.ft.positive) == (-1, 1)
    for hist_range, inside_low in ((None, 4), ([-1, 1], 0)):
        scores = config.resolve(overrides={"scores.histogram_epochs": [0], "scores.histogram_every": 1,
                                           "scores.bins": 20, "scores.rows": None, "scores.range": hist_range}).scores
        rec = ScoreRecorder.from_section(scores, 1, 1, torch.device("cpu"), histogram_range(hist_range, positive))
        rec.start_epoch(0)
        rec.record(0, torch.tensor(1.0), pos, neg, 0.2)
        means = rec.flush(0, 0, [0.1], tmp_path)
        _, hists = load_scores(tmp_path)
        assert hists["pos_count"].sum() == 8  # no score dropped
        below = hists.loc[hists["bin_right"] <= -1.0 + 1e-9, "pos_count"].sum()
        assert below == 4  # the four extrapolated positives at -2
        finite = hists[(hists["bin_left"] > -float("inf")) & (hists["bin_right"] < float("inf"))]
        assert finite.loc[finite["bin_right"] <= -1.0 + 1e-9, "pos_count"].sum() == inside_low
        assert hists["pos_count"].iloc[-1] == 1  # 3.5 lies in the overflow bin
        assert means["pos_outside"] == pytest.approx(5 / 8) and means["neg_outside"] == 0.0
        assert plot_histograms(hists, tmp_path / "h.png", [-1]).stat().st_size > 5_000
