"""The statistics of A/B reports: significance tests, confidence intervals, sample-ratio mismatch.

A treatment arm is compared with the control with the test that fits the metric: two-sided
two-proportion z-test for rates (``thumbs``), Welch's t-test for means (``reward``); the traffic split
is checked for sample-ratio mismatch (chi-square against the configured weights).

The statistics are written out (pooled standard error, Welch–Satterthwaite degrees of freedom, …) and
use ``scipy.stats`` only for the distributions, so the logic can be read and the tests check each
function against scipy's own implementation.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats

from .assign import ABError

__all__ = [
    "SRM_ALPHA",
    "MeanCI",
    "SRMResult",
    "SignificanceResult",
    "mean_confidence_interval",
    "proportion_confidence_interval",
    "srm_check",
    "two_proportion_z_test",
    "welch_t_test",
]

SRM_ALPHA = 0.001
"""Sample-ratio mismatch is flagged below this p-value (the usual, deliberately strict threshold)."""


@dataclass(frozen=True)
class MeanCI:
    """A sample mean (or rate) with its two-sided confidence interval; NaN bounds when undefined."""

    n: int
    mean: float
    low: float
    high: float
    confidence: float = 0.95


@dataclass(frozen=True)
class SignificanceResult:
    """A two-sided test of treatment (b) against control (a)."""

    test: str
    """``"two-proportion z"`` or ``"welch t"``."""
    statistic: float
    """z or t; positive when b is higher than a."""
    p_value: float
    difference: float
    """mean(b) - mean(a) (a rate difference for proportions)."""
    ci_low: float
    ci_high: float
    """Confidence interval of the difference (unpooled Wald for proportions, Welch for means)."""
    df: float | None = None
    """Welch–Satterthwaite degrees of freedom (t-test only)."""


@dataclass(frozen=True)
class SRMResult:
    """Chi-square goodness-of-fit of the observed traffic split against the configured weights."""

    observed: list[int]
    expected: list[float]
    chi2: float
    p_value: float
    flagged: bool
    alpha: float = SRM_ALPHA


def mean_confidence_interval(values: Iterable[float], confidence: float = 0.95) -> MeanCI:
    """Mean with a Student-t confidence interval (NaN bounds below two values)."""
    data = np.asarray(list(values), dtype=float)
    n = int(data.size)
    if n == 0:
        return MeanCI(0, math.nan, math.nan, math.nan, confidence)
    mean = float(data.mean())
    if n == 1:
        return MeanCI(1, mean, math.nan, math.nan, confidence)
    standard_error = float(data.std(ddof=1)) / math.sqrt(n)
    half_width = float(stats.t.ppf((1 + confidence) / 2, n - 1)) * standard_error
    return MeanCI(n, mean, mean - half_width, mean + half_width, confidence)


def proportion_confidence_interval(successes: int, n: int, confidence: float = 0.95) -> MeanCI:
    """Rate ``successes / n`` with a Wilson score interval (sound at small n and rates near 0 or 1)."""
    if n == 0:
        return MeanCI(0, math.nan, math.nan, math.nan, confidence)
    z = float(stats.norm.ppf((1 + confidence) / 2))
    rate = successes / n
    denominator = 1 + z * z / n
    center = (rate + z * z / (2 * n)) / denominator
    half_width = z * math.sqrt(rate * (1 - rate) / n + z * z / (4 * n * n)) / denominator
    return MeanCI(n, rate, center - half_width, center + half_width, confidence)


def two_proportion_z_test(
    successes_a: int, n_a: int, successes_b: int, n_b: int, confidence: float = 0.95
) -> SignificanceResult:
    """Two-sided z-test of equal rates, using the pooled rate under the null hypothesis.

    ``z = (p_b - p_a) / sqrt(p (1 - p) (1/n_a + 1/n_b))`` with ``p`` the pooled rate; ``z²`` equals
    the uncorrected chi-square statistic of the 2x2 table.
    """
    if n_a <= 0 or n_b <= 0:
        raise ABError(f"two-proportion z-test needs at least one observation per arm (got {n_a} and {n_b})")
    if not (0 <= successes_a <= n_a and 0 <= successes_b <= n_b):
        raise ABError("successes must lie between 0 and the number of observations")
    rate_a, rate_b = successes_a / n_a, successes_b / n_b
    pooled = (successes_a + successes_b) / (n_a + n_b)
    pooled_se = math.sqrt(pooled * (1 - pooled) * (1 / n_a + 1 / n_b))
    difference = rate_b - rate_a
    if pooled_se == 0:  # both arms all-success or all-failure: identical rates
        z, p_value = 0.0, 1.0
    else:
        z = difference / pooled_se
        p_value = float(2 * stats.norm.sf(abs(z)))
    unpooled_se = math.sqrt(rate_a * (1 - rate_a) / n_a + rate_b * (1 - rate_b) / n_b)
    half_width = float(stats.norm.ppf((1 + confidence) / 2)) * unpooled_se
    return SignificanceResult(
        "two-proportion z", z, p_value, difference, difference - half_width, difference + half_width
    )


def welch_t_test(a: Iterable[float], b: Iterable[float], confidence: float = 0.95) -> SignificanceResult:
    """Two-sided Welch t-test of equal means (no equal-variance assumption).

    ``t = (mean_b - mean_a) / sqrt(s_a²/n_a + s_b²/n_b)`` with Welch–Satterthwaite degrees of freedom
    ``(s_a²/n_a + s_b²/n_b)² / ((s_a²/n_a)²/(n_a-1) + (s_b²/n_b)²/(n_b-1))``.
    """
    sample_a, sample_b = np.asarray(list(a), dtype=float), np.asarray(list(b), dtype=float)
    n_a, n_b = sample_a.size, sample_b.size
    if n_a < 2 or n_b < 2:
        raise ABError(f"Welch t-test needs at least two observations per arm (got {n_a} and {n_b})")
    var_a_n, var_b_n = sample_a.var(ddof=1) / n_a, sample_b.var(ddof=1) / n_b
    standard_error = math.sqrt(var_a_n + var_b_n)
    difference = float(sample_b.mean() - sample_a.mean())
    if standard_error == 0:  # both arms constant: the means are either equal or certainly different
        t = 0.0 if difference == 0 else math.copysign(math.inf, difference)
        p_value = 1.0 if difference == 0 else 0.0
        return SignificanceResult(
            "welch t", t, p_value, difference, difference, difference, float(n_a + n_b - 2)
        )
    df = (var_a_n + var_b_n) ** 2 / (var_a_n**2 / (n_a - 1) + var_b_n**2 / (n_b - 1))
    t = difference / standard_error
    p_value = float(2 * stats.t.sf(abs(t), df))
    half_width = float(stats.t.ppf((1 + confidence) / 2, df)) * standard_error
    return SignificanceResult(
        "welch t", t, p_value, difference, difference - half_width, difference + half_width, float(df)
    )


def srm_check(observed: Sequence[int], weights: Sequence[float], alpha: float = SRM_ALPHA) -> SRMResult:
    """Sample-ratio-mismatch check: chi-square of observed counts against the configured weights.

    A flag means the split itself is broken (assignment, logging or crashes in one arm) and any
    difference between arms is untrustworthy. Arms with weight 0 and no traffic carry no information
    and are left out; traffic on an arm of weight 0 is a mismatch by definition (p = 0).
    """
    if len(observed) != len(weights):
        raise ABError(f"srm_check got {len(observed)} counts for {len(weights)} weights")
    total_weight, total = float(sum(weights)), int(sum(observed))
    if total_weight <= 0:
        raise ABError("srm_check needs weights that add up to more than 0")
    expected = [total * weight / total_weight for weight in weights]
    if total == 0:
        return SRMResult(list(observed), expected, 0.0, 1.0, False, alpha)
    if any(count > 0 and weight <= 0 for count, weight in zip(observed, weights, strict=True)):
        return SRMResult(list(observed), expected, math.inf, 0.0, True, alpha)
    kept = [(count, exp) for count, exp in zip(observed, expected, strict=True) if exp > 0]
    if len(kept) < 2:
        return SRMResult(list(observed), expected, 0.0, 1.0, False, alpha)
    chi2 = sum((count - exp) ** 2 / exp for count, exp in kept)
    p_value = float(stats.chi2.sf(chi2, len(kept) - 1))
    return SRMResult(list(observed), expected, float(chi2), p_value, p_value < alpha, alpha)
