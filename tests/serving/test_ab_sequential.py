"""The always-valid sequential test (mSPRT), the MDE, and the simulation that checks their error rates."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import integrate, stats

from serving.ab.sequential import (
    confidence_sequence_half_width,
    minimum_detectable_effect,
    msprt_log_likelihood_ratio,
    sequential_minimum_detectable_effect,
    sequential_test,
    welch_looks,
)
from serving.ab.simulation import SimulationSettings, simulate


@pytest.mark.parametrize(("d", "v", "tau2"), [(0.0, 0.01, 0.04), (0.1, 0.001, 0.0004), (-0.3, 0.02, 0.01)])
def test_msprt_is_the_normal_mixture_of_likelihood_ratios(d: float, v: float, tau2: float) -> None:
    """Λ = ∫ N(d; θ, V) / N(d; 0, V) dN(θ; 0, τ²), computed by quadrature."""

    def integrand(theta: float) -> float:
        ratio = math.exp((d * theta - theta * theta / 2) / v)
        return ratio * stats.norm.pdf(theta, 0, math.sqrt(tau2))

    reference, _ = integrate.quad(integrand, -12 * math.sqrt(tau2), 12 * math.sqrt(tau2), limit=200)
    assert math.exp(float(msprt_log_likelihood_ratio(d, v, tau2))) == pytest.approx(reference, rel=1e-6)


def test_confidence_sequence_is_where_the_likelihood_ratio_reaches_one_over_alpha() -> None:
    v, tau2, alpha = 0.004, 0.01, 0.05
    half = float(confidence_sequence_half_width(v, tau2, alpha))
    assert float(msprt_log_likelihood_ratio(half, v, tau2)) == pytest.approx(math.log(1 / alpha))
    assert half > stats.norm.ppf(0.975) * math.sqrt(v)  # wider than the one-look interval


def test_sequential_test_keeps_the_strongest_evidence_and_agrees_with_its_interval() -> None:
    rng = np.random.default_rng(4)
    n = np.arange(40, 2000, 40)
    differences = 0.1 + rng.normal(0, 1, n.size) / np.sqrt(n)  # a true effect of 0.1 SD
    variances = 2.0 / n
    first = None
    for looks in range(1, n.size + 1):
        result = sequential_test(differences[:looks], variances[:looks], np.ones(looks))
        assert result is not None and result.looks == looks
        assert result.significant == (result.ci_low > 0 or result.ci_high < 0)
        if first is not None:
            assert result.p_value <= first.p_value  # the always-valid p-value never rises
            assert first.ci_low <= result.ci_low and result.ci_high <= first.ci_high  # nor widens
        first = result
    assert first is not None and first.significant
    assert sequential_test([math.nan], [0.0], [1.0]) is None


def test_minimum_detectable_effect() -> None:
    # Fixed horizon: (z_0.975 + z_0.8) · SE = 2.8016 · SE.
    assert minimum_detectable_effect(0.01) == pytest.approx(0.028016, abs=1e-6)
    assert math.isnan(minimum_detectable_effect(0.0))
    # Sequential: the boundary plus 0.8416 SE, larger than the fixed-horizon MDE.
    v, tau2 = 1e-4, 4e-4
    expected = float(confidence_sequence_half_width(v, tau2, 0.05)) + 0.841621 * 0.01
    assert sequential_minimum_detectable_effect(v, tau2) == pytest.approx(expected, rel=1e-5)
    assert sequential_minimum_detectable_effect(v, tau2) > minimum_detectable_effect(0.01)


def test_welch_looks_replays_unit_means_as_outcomes_arrive() -> None:
    # Control: units 0..39 with value 0. Treatment: units 0..39, each rated 0 at t=1 and 1 at t=2.
    units = np.arange(40)
    control = (units, np.ones(40), np.zeros(40))
    treatment = (
        np.concatenate([units, units]),
        np.r_[np.ones(40), 2 * np.ones(40)],
        np.r_[np.zeros(40), np.ones(40)],
    )
    differences, variances, pooled = welch_looks(control, treatment, min_units=30)
    assert differences.tolist() == [0.0, 0.5]  # a unit's value is the mean of its outcomes so far
    assert variances.tolist() == [0.0, 0.0] and pooled.tolist() == [0.0, 0.0]
    few = welch_looks((units[:10], np.ones(10), np.zeros(10)), treatment, min_units=30)
    assert all(array.size == 0 for array in few)  # no look before every arm has min_units units


def test_simulation_false_positive_rates_with_heavy_tailed_users() -> None:
    """No true difference; heavy-tailed requests per user (median 2, p99 ~90, cap 500) with per-user
    effects: per-user Welch holds its 5 %, per request it does not, and peeking breaks the fixed test
    while the mSPRT, checked at 50 looks, stays below 5 %."""
    result = simulate(SimulationSettings(experiments=2000, users=400, seed=12))
    rates = result["rejection_rate"]
    assert result["requests_per_user"]["median"] <= 2 and result["requests_per_user"]["max"] >= 300
    assert rates["per_user"] <= 0.06
    assert rates["per_request"] >= 0.3  # the old per-request test: anti-conservative
    assert rates["per_user_peeking"] >= 0.15  # the right test, peeked at: also broken
    assert rates["sequential"] <= 0.05


def test_simulation_power_of_the_sequential_test() -> None:
    """A realistic effect (+0.05 reward, a quarter of a per-user SD): the fixed test at the planned end
    has about 65 % power; the always-valid test, which may also stop early, keeps a good part of it."""
    result = simulate(SimulationSettings(experiments=1000, users=400, effect=0.05, seed=13))
    rates = result["rejection_rate"]
    assert rates["per_user"] >= 0.5
    assert rates["sequential"] >= 0.2
    assert result["sequential_stop_median"] < 1.0


def test_simulation_of_thumbs() -> None:
    rates = simulate(SimulationSettings(experiments=1000, users=400, metric="thumbs", user_sd=1.0, seed=14))[
        "rejection_rate"
    ]
    assert rates["per_user"] <= 0.07 and rates["sequential"] <= 0.05 and rates["per_request"] >= 0.2
