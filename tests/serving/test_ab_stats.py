"""A/B statistics, each checked against scipy's own implementation."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from serving.ab.assign import ABError
from serving.ab.stats import (
    mean_confidence_interval,
    proportion_confidence_interval,
    srm_check,
    two_proportion_z_test,
    welch_t_test,
)

WELCH_CASES = [
    ([1.0, 2.0, 3.0, 4.0, 5.0], [2.0, 4.0, 6.0, 8.0, 10.0, 12.0]),
    ([0.2, 0.4, 0.1, 0.9], [0.25, 0.3, 0.35]),
    (
        list(np.random.default_rng(0).normal(0.5, 0.1, 40)),
        list(np.random.default_rng(1).normal(0.55, 0.3, 300)),
    ),
    (
        list(np.random.default_rng(2).exponential(1.0, 1000)),
        list(np.random.default_rng(3).exponential(1.0, 900)),
    ),
]


@pytest.mark.parametrize(("a", "b"), WELCH_CASES)
def test_welch_t_test_matches_scipy(a: list[float], b: list[float]) -> None:
    ours = welch_t_test(a, b)
    reference = stats.ttest_ind(b, a, equal_var=False)  # b - a: treatment minus control
    assert ours.statistic == pytest.approx(reference.statistic, rel=1e-10)
    assert ours.p_value == pytest.approx(reference.pvalue, rel=1e-9)
    assert ours.df == pytest.approx(reference.df, rel=1e-10)
    interval = reference.confidence_interval(0.95)
    assert (ours.ci_low, ours.ci_high) == pytest.approx((interval.low, interval.high), rel=1e-9)
    assert ours.difference == pytest.approx(np.mean(b) - np.mean(a))


def test_welch_t_test_edge_cases() -> None:
    assert welch_t_test([1, 1, 1], [1, 1]).p_value == 1.0
    constant_apart = welch_t_test([1, 1, 1], [2, 2])
    assert constant_apart.p_value == 0.0 and constant_apart.statistic == math.inf
    with pytest.raises(ABError, match="at least two"):
        welch_t_test([1.0], [1.0, 2.0])


# (successes_a, n_a, successes_b, n_b)
PROPORTION_CASES = [(45, 100, 60, 100), (120, 1000, 150, 1000), (5, 20, 1, 25), (300, 400, 1200, 1500)]


@pytest.mark.parametrize(("sa", "na", "sb", "nb"), PROPORTION_CASES)
def test_two_proportion_z_test_matches_uncorrected_chi_square(sa: int, na: int, sb: int, nb: int) -> None:
    ours = two_proportion_z_test(sa, na, sb, nb)
    table = [[sa, na - sa], [sb, nb - sb]]
    reference = stats.chi2_contingency(table, correction=False)
    assert ours.statistic**2 == pytest.approx(reference.statistic, rel=1e-10)
    assert ours.p_value == pytest.approx(reference.pvalue, rel=1e-9)
    assert math.copysign(1, ours.statistic) == math.copysign(1, sb / nb - sa / na)


def test_two_proportion_z_test_known_case() -> None:
    # 45/100 vs 60/100: pooled 0.525, se = sqrt(.525 * .475 * .02) = 0.0706222, z = 0.15 / se.
    result = two_proportion_z_test(45, 100, 60, 100)
    assert result.statistic == pytest.approx(2.12398, abs=1e-5)
    assert result.p_value == pytest.approx(0.033672, abs=1e-6)
    # Unpooled Wald interval of the difference: 0.15 ± 1.959964 * sqrt(.45*.55/100 + .6*.4/100).
    assert (result.ci_low, result.ci_high) == pytest.approx((0.013153, 0.286847), abs=1e-6)
    assert two_proportion_z_test(10, 10, 20, 20).p_value == 1.0
    with pytest.raises(ABError):
        two_proportion_z_test(0, 0, 1, 2)


@pytest.mark.parametrize(("k", "n"), [(0, 10), (3, 10), (10, 10), (57, 100), (480, 1000)])
def test_wilson_interval_matches_scipy(k: int, n: int) -> None:
    ours = proportion_confidence_interval(k, n)
    reference = stats.binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
    assert (ours.low, ours.high) == pytest.approx((reference.low, reference.high), abs=1e-12)
    assert ours.mean == k / n and ours.n == n


def test_mean_confidence_interval_matches_scipy() -> None:
    values = list(np.random.default_rng(5).normal(3.0, 2.0, 57))
    ours = mean_confidence_interval(values)
    low, high = stats.t.interval(0.95, len(values) - 1, loc=np.mean(values), scale=stats.sem(values))
    assert (ours.low, ours.high) == pytest.approx((low, high), rel=1e-12)
    assert mean_confidence_interval([]).n == 0 and math.isnan(mean_confidence_interval([]).mean)
    single = mean_confidence_interval([2.0])
    assert single.mean == 2.0 and math.isnan(single.low)


@pytest.mark.parametrize(
    ("observed", "weights"), [([9000, 1000], [90, 10]), ([5020, 4980], [1, 1]), ([310, 290, 400], [3, 3, 4])]
)
def test_srm_check_matches_scipy_chisquare(observed: list[int], weights: list[float]) -> None:
    ours = srm_check(observed, weights)
    expected = [sum(observed) * w / sum(weights) for w in weights]
    reference = stats.chisquare(observed, expected)
    assert ours.chi2 == pytest.approx(reference.statistic, rel=1e-12)
    assert ours.p_value == pytest.approx(reference.pvalue, rel=1e-9)
    assert not ours.flagged


def test_srm_flags_a_skewed_split() -> None:
    result = srm_check([5000, 5500], [50, 50])  # 47.6 % vs the configured 50 %
    assert result.flagged and result.p_value < 0.001
    assert srm_check([8800, 1200], [90, 10]).flagged
    assert srm_check([10, 1], [1, 0]).flagged  # traffic on a weight-0 arm
    assert not srm_check([0, 0], [1, 1]).flagged
