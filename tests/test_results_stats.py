"""The table maths (ftcl/results/stats.py): paired differences with Student t intervals, Welch's
interval when seeds are unpaired, no interval below two seeds, checked by hand and against scipy."""

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps

from ftcl.results import stats


def test_paired_interval_matches_a_hand_computation():
    # differences 1, 2, 3, 6: mean 3, sd sqrt(14/3), t(0.975, 3) = 3.182446305
    row = {0: 11.0, 1: 12.0, 2: 13.0, 3: 16.0}
    ref = {0: 10.0, 1: 10.0, 2: 10.0, 3: 10.0}
    d = stats.difference(row, ref)
    half = 3.182446305284263 * math.sqrt(14 / 3) / 2
    assert d.method == stats.PAIRED and d.n == 4
    assert (d.delta, d.low, d.high) == pytest.approx((3.0, 3.0 - half, 3.0 + half), abs=1e-9)
    assert d.low == pytest.approx(-0.43743, abs=1e-5) and not d.excludes_zero  # +3 on average, yet noise


def test_paired_interval_equals_scipys_paired_t_test_interval():
    row = {s: v for s, v in enumerate([71.2, 70.4, 73.9, 72.5, 70.8])}
    ref = {s: v for s, v in enumerate([70.1, 70.9, 71.0, 71.7, 69.5])}
    d = stats.difference(row, ref)
    ci = sps.ttest_rel(list(row.values()), list(ref.values())).confidence_interval(0.95)
    assert (d.low, d.high) == pytest.approx((ci.low, ci.high), abs=1e-9)
    assert d.excludes_zero == (ci.low > 0 or ci.high < 0)


def test_pairing_uses_only_the_seeds_both_rows_have():
    d = stats.difference({0: 5.0, 1: 6.0, 2: 9.0, 7: 100.0}, {0: 4.0, 1: 4.0, 2: 4.0})
    assert d.n == 3 and d.delta == pytest.approx((1 + 2 + 5) / 3)


def test_unpaired_seeds_use_welchs_interval_as_scipy_does():
    row, ref = {0: 70.0, 1: 72.0, 2: 71.0}, {5: 68.0, 6: 69.5, 7: 67.0, 8: 68.4}
    d = stats.difference(row, ref)
    ci = sps.ttest_ind(list(row.values()), list(ref.values()), equal_var=False).confidence_interval(0.95)
    assert d.method == stats.WELCH
    assert (d.low, d.high) == pytest.approx((ci.low, ci.high), abs=1e-9)
    assert d.delta == pytest.approx(71.0 - (68 + 69.5 + 67 + 68.4) / 4)


def test_fewer_than_two_seeds_give_a_difference_without_an_interval():
    d = stats.difference({0: 71.0}, {0: 70.0})
    assert d.method == stats.NONE and d.delta == 1.0 and math.isnan(d.low) and not d.excludes_zero
    assert math.isnan(stats.difference({0: math.nan}, {0: 70.0}).delta)


def test_an_interval_that_touches_zero_does_not_exclude_it():
    assert not stats.Difference(1.0, 0.0, 2.0, 3, stats.PAIRED).excludes_zero
    assert stats.Difference(-1.0, -2.0, -0.1, 3, stats.PAIRED).excludes_zero


def test_the_mean_interval_is_scipys_t_interval():
    values = [64.3, 68.0, 66.1, 65.2]
    mean, low, high = stats.mean_interval(values)
    ref = sps.t.interval(0.95, len(values) - 1, loc=sum(values) / 4, scale=sps.sem(values))
    assert (low, high) == pytest.approx(ref, abs=1e-9) and mean == pytest.approx(sum(values) / 4)


def test_a_timing_ratio_is_the_geometric_mean_of_the_pairs_with_a_t_interval_on_the_logs():
    ratios = [0.9, 1.0, 1.1, 0.95]
    logs = np.log(ratios)
    half = sps.t.ppf(0.975, 3) * logs.std(ddof=1) / np.sqrt(4)
    ratio, low, high = stats.ratio_interval(ratios)
    assert ratio == pytest.approx(np.exp(logs.mean()))
    assert (low, high) == pytest.approx((np.exp(logs.mean() - half), np.exp(logs.mean() + half)))
    assert low < ratio < high and ratio != pytest.approx(np.mean(ratios))  # not the arithmetic mean


def test_a_benchmark_goal_is_met_only_when_the_whole_interval_clears_it():
    assert stats.goal_verdict(2.01, 2.10, 2.0) == "met"
    assert stats.goal_verdict(1.84, 1.95, 2.0) == "not met"
    assert stats.goal_verdict(1.95, 2.05, 2.0) == "undecided"  # the point estimate does not decide
    assert stats.goal_verdict(0.97, 1.01, 0.97) == "met"  # the bound itself counts


def test_against_compares_every_row_with_one_reference_row():
    frame = pd.DataFrame({"row": ["floor"] * 3 + ["moco"] * 3, "seed": [0, 1, 2] * 2,
                          "linear_top1": [60.0, 61.0, 59.0, 70.0, 71.5, 69.0], "knn_top1": [math.nan] * 6})
    lines = stats.against(frame, "floor", ["linear_top1", "knn_top1"])
    assert lines["row"].tolist() == ["moco"] and lines["metric"].tolist() == ["linear_top1"]
    assert lines["delta"].iloc[0] == pytest.approx(10.0 + 0.5 / 3) and bool(lines["excludes_zero"].iloc[0])
