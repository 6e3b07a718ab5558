"""Paired statistics (firm.stats) against scipy and hand-computed values on known data."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats as scipy_stats

from firm.stats import (bootstrap_interval, compare_table, holm, paired_differences, smallest_wilcoxon_p, tost_p, verdict,
                        wilcoxon_p)

A = np.array([1.83, 0.50, 1.62, 2.48, 1.68, 1.88, 1.55, 3.06, 1.30])
B = np.array([0.878, 0.647, 0.598, 2.05, 1.06, 1.29, 1.06, 3.14, 1.29])  # scipy's wilcoxon doc example


def test_paired_differences_and_wilcoxon_match_scipy():
    d = paired_differences(A, B)
    assert np.allclose(d, A - B)
    assert wilcoxon_p(d) == pytest.approx(scipy_stats.wilcoxon(A, B).pvalue)
    assert wilcoxon_p(d) == pytest.approx(0.0390625)  # exact: 2 * 10 / 2^9


def test_paired_differences_rejects_mismatched_samples():
    with pytest.raises(ValueError):
        paired_differences([1, 2, 3], [1, 2])
    with pytest.raises(ValueError):
        paired_differences([1, np.nan], [1, 2])


def test_holm_by_hand():
    # sorted p: 0.01 (x4) 0.02 (x3) 0.03 (x2) 0.04 (x1) -> 0.04, 0.06, 0.06 (monotone), 0.06
    assert np.allclose(holm([0.03, 0.01, 0.04, 0.02]), [0.06, 0.04, 0.06, 0.06])
    assert np.allclose(holm([0.5, 0.9]), [1.0, 1.0])  # capped at 1
    assert holm([]).size == 0


def test_tost_matches_two_scipy_one_sided_tests():
    d = A - B
    margin = 0.8
    lower = scipy_stats.ttest_1samp(d, -margin, alternative="greater").pvalue
    upper = scipy_stats.ttest_1samp(d, margin, alternative="less").pvalue
    assert tost_p(d, margin) == pytest.approx(max(lower, upper))
    assert tost_p(d, 0.01) > 0.5  # the mean difference (0.35) is far outside a 0.01 margin


def test_bootstrap_interval_covers_the_mean_and_is_reproducible():
    d = A - B
    low, high = bootstrap_interval(d, seed=3)
    assert low < d.mean() < high
    assert (low, high) == bootstrap_interval(d, seed=3)
    # the percentile interval of the resampled means is close to the t interval here
    t_low, t_high = scipy_stats.t.interval(0.95, d.size - 1, loc=d.mean(), scale=scipy_stats.sem(d))
    assert abs(low - t_low) < 0.1 and abs(high - t_high) < 0.1


def test_identical_algorithms_are_equivalent_not_tested():
    same = np.linspace(0, 1, 20)
    assert wilcoxon_p(same - same) == 1.0
    assert bootstrap_interval(same - same) == (0.0, 0.0)
    (c,) = compare_table([{"metric": "m", "a": "x", "b": "y", "better": "lower", "values_a": same, "values_b": same}])
    assert c.verdict == "equivalent" and "identical" in c.reason and c.p == 1.0


def test_verdicts_on_known_data():
    rng = np.random.default_rng(0)
    base = rng.normal(10, 1, 20)
    rows = [
        {"metric": "loss", "a": "better", "b": "base", "better": "lower", "values_a": base - 2 + rng.normal(0, .1, 20),
         "values_b": base},
        {"metric": "loss", "a": "worse", "b": "base", "better": "lower", "values_a": base + 2 + rng.normal(0, .1, 20),
         "values_b": base},
        {"metric": "loss", "a": "tiny", "b": "base", "better": "lower", "values_a": base + rng.normal(0, .01, 20),
         "values_b": base},
        {"metric": "loss", "a": "noisy", "b": "base", "better": "lower", "values_a": base + rng.normal(0, 3, 20),
         "values_b": base},
    ]
    words = [c.verdict for c in compare_table(rows)]
    assert words == ["confirmed", "refuted", "equivalent", "not separable"]
    out = compare_table(rows)
    raw = [c.p for c in out]
    assert np.allclose([c.p_holm for c in out], holm(raw))
    assert out[0].margin == pytest.approx(0.05 * np.mean(np.abs(base)))


def test_verdict_direction_and_bad_input():
    assert verdict(1.0, (0.5, 1.5), 0.001, 1.0, "higher")[0] == "confirmed"
    assert verdict(1.0, (0.5, 1.5), 0.001, 1.0, "lower")[0] == "refuted"
    assert verdict(1.0, (-0.5, 1.5), 0.001, 1.0, "lower")[0] == "not separable"  # the interval covers 0
    with pytest.raises(ValueError):
        verdict(1.0, (0.5, 1.5), 0.001, 1.0, "up")


def test_round_off_differences_count_as_identical():
    zeros_by_construction = np.array([1e-18, -2e-18, 0.0, 5e-19] * 5)  # e.g. the spread of identical clients
    (c,) = compare_table([{"metric": "spread", "a": "x", "b": "y", "better": "lower",
                           "values_a": zeros_by_construction, "values_b": np.zeros(20)}])
    assert c.verdict == "equivalent" and "identical" in c.reason
    (c,) = compare_table([{"metric": "spread", "a": "x", "b": "y", "better": "lower",
                           "values_a": zeros_by_construction, "values_b": np.zeros(20)}], zero_tolerance=0.0)
    assert c.verdict != "equivalent" or "identical" not in c.reason


def test_holm_corrects_over_the_primary_comparisons_only():
    rng = np.random.default_rng(3)
    rows = [{"metric": f"m{i}", "a": "x", "b": "y", "better": "higher", "values_a": rng.normal(1.0, 0.1, 8),
             "values_b": rng.normal(0.0, 0.1, 8), "primary": i < 2, "margin": 0.01} for i in range(6)]
    table = compare_table(rows)
    raw = [c.p for c in table]
    # independent reference: Holm by hand over the two primary p-values
    first, second = sorted(range(2), key=raw.__getitem__)
    expected = {first: 2 * raw[first], second: max(2 * raw[first], raw[second])}
    for i, c in enumerate(table):
        if i < 2:
            assert not c.exploratory and c.holm_tested and c.p_holm == pytest.approx(min(expected[i], 1.0))
        else:  # exploratory: uncorrected, and labelled
            assert c.exploratory and not c.holm_tested and c.p_holm == c.p and c.reason.startswith("exploratory")


def test_an_absolute_margin_decides_equivalence():
    a, b = np.full(8, 1.0) + np.linspace(-1e-3, 1e-3, 8), np.full(8, 1.0)
    row = {"metric": "m", "a": "x", "b": "y", "better": "higher", "values_a": a, "values_b": b}
    (inside,) = compare_table([{**row, "margin": 0.01}])
    (outside,) = compare_table([{**row, "margin": 1e-5}])
    assert inside.verdict == "equivalent" and inside.margin == 0.01
    assert outside.verdict == "not separable"


def test_a_deterministic_metric_needs_no_test():
    row = {"metric": "bytes", "a": "firm", "b": "fsmgda", "better": "lower", "deterministic": True,
           "values_a": [100.0, 100.0, 100.0], "values_b": [200.0, 200.0, 200.0]}
    (c,) = compare_table([row])
    assert c.verdict == "confirmed" and "by construction" in c.reason and c.mean_diff == -100
    (same,) = compare_table([{**row, "values_b": [100.0] * 3}])
    assert same.verdict == "equivalent"
    # decided without a test, so outside the Holm family even when primary; a deterministic
    # metric whose differences vary is tested, uncorrected, and outside it too
    varies = compare_table([{**row, "values_b": [200.0, 150.0, 120.0]}])
    assert not c.holm_tested and not same.holm_tested and not varies[0].holm_tested and varies[0].exploratory


@pytest.mark.parametrize("n", [3, 5, 6, 8])
def test_smallest_wilcoxon_p_is_what_scipy_gives_for_all_positive_differences(n):
    from scipy import stats as scipy_stats
    d = np.arange(1, n + 1, dtype=float)
    assert smallest_wilcoxon_p(n) == pytest.approx(scipy_stats.wilcoxon(d).pvalue)
    assert (smallest_wilcoxon_p(n) < 0.05) == (n >= 6)


@pytest.mark.parametrize("n", [5, 6, 7, 8, 9])
def test_smallest_p_under_holm_over_four_primaries_is_holms_adjustment_of_the_smallest_wilcoxon_p(n):
    # every primary as strong as n seeds allow: Holm's adjusted p of the best one
    best = holm([smallest_wilcoxon_p(n)] * 4)
    assert smallest_wilcoxon_p(n, comparisons=4) == pytest.approx(min(best))
    assert (smallest_wilcoxon_p(n, comparisons=4) < 0.05) == (n >= 8)
