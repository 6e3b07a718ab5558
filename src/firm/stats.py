"""Paired statistics for comparing algorithms run on shared seeds.

Every algorithm in `firm synthetic` (and in `firm compare` / `firm pareto`) runs on the same
seeds: the same problem, partition and random numbers. So the unit of comparison is the seed,
and the right statistics are paired: per-seed differences ``a_s - b_s``, a paired bootstrap
interval of their mean, a Wilcoxon signed-rank test, Holm's correction over the comparisons of
one table's *primary* comparisons, and two one-sided tests (TOST) for equivalence within a
margin fixed before the run (absolute, per metric; a relative margin for the synthetic grid).
Comparisons not named primary are exploratory: their p-values are not corrected and the table
labels them so. A metric that is deterministic (bytes sent) needs no test: the same difference
on every seed is reported as it is.

``verdict`` turns them into one word: confirmed / refuted / equivalent / not separable, with a
reason. Identical algorithms (every difference exactly zero) are handled explicitly: they are
equivalent, with p = 1 for the difference test, and no test is run on an all-zero sample.
All functions are pure (the bootstrap takes its seed as an argument).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np
from scipy import stats as scipy_stats

VERDICTS = ("confirmed", "refuted", "equivalent", "not separable")


def paired_differences(a: Sequence[float], b: Sequence[float]) -> np.ndarray:
    """Per-seed differences a_s - b_s (both indexed by the same seeds, same length, finite)."""
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1 or x.size < 2:
        raise ValueError(f"paired samples must be 1-D of equal length >= 2, got {x.shape} and {y.shape}")
    if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y))):
        raise ValueError("paired samples must be finite")
    return x - y


def bootstrap_interval(diffs: Sequence[float], level: float = 0.95, resamples: int = 10_000,
                       seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean paired difference (seeds resampled with replacement)."""
    d = np.asarray(diffs, dtype=np.float64)
    if not np.any(d != d[0]):
        return float(d[0]), float(d[0])
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, d.size, size=(resamples, d.size))].mean(axis=1)
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(low), float(high)


def wilcoxon_p(diffs: Sequence[float]) -> float:
    """Two-sided Wilcoxon signed-rank p-value of the paired differences (zeros dropped, scipy's
    default); 1.0 when every difference is zero (nothing to rank)."""
    d = np.asarray(diffs, dtype=np.float64)
    if not np.any(d):
        return 1.0
    return float(scipy_stats.wilcoxon(d).pvalue)


def holm(pvalues: Sequence[float]) -> np.ndarray:
    """Holm's step-down adjusted p-values (family-wise error over one table's comparisons)."""
    p = np.asarray(pvalues, dtype=np.float64)
    if p.size == 0:
        return p.copy()
    order = np.argsort(p, kind="stable")
    scaled = (p.size - np.arange(p.size)) * p[order]
    adjusted = np.empty_like(p)
    adjusted[order] = np.minimum(np.maximum.accumulate(scaled), 1.0)
    return adjusted


def tost_p(diffs: Sequence[float], margin: float) -> float:
    """Two one-sided t-tests: p-value of 'the mean difference lies inside (-margin, margin)'.

    The larger of the p-values of H0: mean <= -margin and H0: mean >= margin. A sample with no
    spread (all differences equal) gives 0 when it lies strictly inside the margin, else 1.
    """
    d = np.asarray(diffs, dtype=np.float64)
    if margin <= 0:
        return 0.0 if not np.any(d) else 1.0
    if not np.any(d != d[0]):
        return 0.0 if abs(d[0]) < margin else 1.0
    lower = scipy_stats.ttest_1samp(d, -margin, alternative="greater").pvalue
    upper = scipy_stats.ttest_1samp(d, margin, alternative="less").pvalue
    return float(max(lower, upper))


@dataclass(frozen=True)
class Comparison:
    """One paired comparison of algorithm a against baseline b on one metric."""

    metric: str
    a: str
    b: str
    better: str
    n: int
    mean_a: float
    mean_b: float
    mean_diff: float
    ci_low: float
    ci_high: float
    p: float
    p_holm: float
    margin: float
    p_equivalence: float
    verdict: str
    reason: str
    exploratory: bool = False
    """not one of the comparisons named before the run: p is uncorrected, the verdict a lead"""
    holm_tested: bool = False
    """one of the Holm family: a tested (not deterministic) primary comparison; p_holm is adjusted"""

    def to_dict(self) -> dict:
        return asdict(self)


def verdict(mean_diff: float, ci: tuple[float, float], p_holm: float, p_equivalence: float, better: str,
            identical: bool = False, alpha: float = 0.05) -> tuple[str, str]:
    """One word and its reason. ``better`` is 'lower' or 'higher': the direction the claim says
    a (FIRM) improves on b.

    identical -> equivalent. Else equivalence (TOST p < alpha: within the margin) -> equivalent.
    Else a Holm-adjusted Wilcoxon p < alpha with a bootstrap interval that excludes 0 ->
    confirmed when the difference goes the claimed way, refuted when it goes the other way.
    Anything else is not separable.
    """
    if better not in ("lower", "higher"):
        raise ValueError(f"better must be 'lower' or 'higher', got {better!r}")
    if identical:
        return "equivalent", "identical on every seed (all paired differences are 0)"
    if p_equivalence < alpha:
        return "equivalent", f"inside the equivalence margin (TOST p = {p_equivalence:.2g})"
    low, high = ci
    if p_holm < alpha and (low > 0 or high < 0):
        improves = (mean_diff < 0) == (better == "lower")
        word = "confirmed" if improves else "refuted"
        return word, (f"{'better' if improves else 'worse'} ({better} is better), Holm p = {p_holm:.2g}, "
                      f"95% CI [{low:.3g}, {high:.3g}]")
    return "not separable", (f"Holm p = {p_holm:.2g}, 95% CI [{low:.3g}, {high:.3g}], not within the margin "
                             f"(TOST p = {p_equivalence:.2g})")


ZERO_TOLERANCE = 1e-12
"""Paired differences this small (absolute) are round-off: a metric that is 0 by construction for
both algorithms (the spread of identical clients' lambda) comes out as +-1e-18, not as 0."""


def smallest_wilcoxon_p(n: int, comparisons: int = 1) -> float:
    """The smallest two-sided p an exact Wilcoxon signed-rank test can give with n pairs (every
    difference of one sign): 2 / 2^n; below n = 6 it is above 0.05, so nothing can be confirmed.
    With Holm's correction over ``comparisons`` tests the smallest adjusted p is that times
    ``comparisons`` (over 4 primaries: below 0.05 only from n = 8)."""
    return min(1.0, comparisons * 2.0 / 2 ** n)


def deterministic_comparison(row: dict, d: np.ndarray, va: np.ndarray, vb: np.ndarray) -> Comparison:
    """A metric fixed by construction (the same difference on every seed): no test, the
    difference itself decides."""
    diff = float(d[0])
    if diff == 0:
        word, reason = "equivalent", "equal by construction (deterministic metric, no test needed)"
    else:
        improves = (diff < 0) == (row["better"] == "lower")
        word = "confirmed" if improves else "refuted"
        reason = f"{diff:+.6g} on every seed by construction (deterministic metric, no test needed)"
    return Comparison(row["metric"], row["a"], row["b"], row["better"], int(d.size), float(va.mean()),
                      float(vb.mean()), diff, diff, diff, 0.0 if diff else 1.0, 0.0 if diff else 1.0, 0.0,
                      1.0 if diff else 0.0, word, reason, not row.get("primary", True))


def compare_table(rows: Sequence[dict], relative_margin: float = 0.05, alpha: float = 0.05,
                  resamples: int = 10_000, seed: int = 0, zero_tolerance: float = ZERO_TOLERANCE
                  ) -> list[Comparison]:
    """Paired comparisons of one table; Holm's correction over its primary comparisons only.

    Each row: ``metric``, ``a`` and ``b`` (names), ``values_a`` and ``values_b`` (per seed, same
    seed order) and ``better`` ('lower' / 'higher'); optionally ``margin`` (the equivalence
    margin in the metric's own units, fixed before the run; without it ``relative_margin``
    times the baseline's mean absolute value), ``primary`` (default True; False = exploratory:
    uncorrected p, labelled) and ``deterministic`` (no test: see deterministic_comparison).
    Differences all within ``zero_tolerance`` count as identical.
    """
    prepared = []
    for row in rows:
        va, vb = np.asarray(row["values_a"], float), np.asarray(row["values_b"], float)
        d = paired_differences(va, vb)
        if np.all(np.abs(d) <= zero_tolerance):
            d = np.zeros_like(d)
        if "margin" in row:
            margin = float(row["margin"])
        else:
            scale = float(np.mean(np.abs(vb))) or max(float(np.mean(np.abs(va))), 0.0)
            margin = relative_margin * scale
        prepared.append((row, va, vb, d, margin, wilcoxon_p(d)))
    tested = [i for i, item in enumerate(prepared) if not item[0].get("deterministic")]
    primary = [i for i in tested if prepared[i][0].get("primary", True)]
    adjusted = dict(zip(primary, holm([prepared[i][5] for i in primary])))
    out = []
    for i, (row, va, vb, d, margin, p) in enumerate(prepared):
        if row.get("deterministic") and not np.any(d != d[0]):
            out.append(deterministic_comparison(row, d, va, vb))
            continue
        exploratory = i not in adjusted
        p_adj = float(adjusted.get(i, p))
        ci = bootstrap_interval(d, resamples=resamples, seed=seed)
        identical = not np.any(d)
        p_eq = tost_p(d, margin)
        word, reason = verdict(float(d.mean()), ci, p_adj, p_eq, row["better"], identical, alpha)
        if exploratory:
            reason = "exploratory, uncorrected: " + reason.replace("Holm p", "p")
        out.append(Comparison(row["metric"], row["a"], row["b"], row["better"], int(d.size), float(va.mean()),
                              float(vb.mean()), float(d.mean()), ci[0], ci[1], p, p_adj, margin, p_eq,
                              word, reason, exploratory, holm_tested=not exploratory))
    return out


__all__ = ["VERDICTS", "Comparison", "bootstrap_interval", "compare_table", "deterministic_comparison", "holm",
           "paired_differences", "smallest_wilcoxon_p", "tost_p", "verdict", "wilcoxon_p", "ZERO_TOLERANCE"]
