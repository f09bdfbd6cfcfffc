"""Always-valid inference for A/B reports that are looked at again and again.

People run ``moea ab report`` every hour and stop when it says "significant". A fixed-horizon test
(z, Welch) checked that way rejects a true null far more often than its alpha. The default verdict is
therefore the normal-mixture sequential probability ratio test (mSPRT) of Johari, Koomen, Pekelis and
Walsh ("Peeking at A/B tests", KDD 2017; "Always valid inference", Operations Research 2022) on the
difference of means between treatment and control, per analysis unit:

- ``d`` is ``mean_b - mean_a`` and ``V = s_a²/n_a + s_b²/n_b`` its (Welch) variance; ``d / V`` is,
  in information time ``1/V``, a Brownian motion with drift equal to the true difference ``θ``.
- Mixing the likelihood ratio of ``θ`` against ``0`` over ``θ ~ N(0, τ²)`` gives the martingale
  ``Λ = sqrt(V / (V + τ²)) · exp(τ² d² / (2 V (V + τ²)))``; by Ville's inequality the chance that
  ``Λ`` *ever* reaches ``1/α`` under the null is at most ``α``, however often one looks.
- The always-valid p-value is the running minimum of ``min(1, 1/Λ)`` over the looks; the confidence
  sequence is the running intersection of ``{θ₀ : Λ(θ₀) < 1/α}``, i.e. ``d ± sqrt(V (V + τ²) / τ² ·
  (2 ln(1/α) + ln((V + τ²) / V)))``. Both agree: ``p ≤ α`` exactly when 0 has left the sequence.

The mixing variance ``τ²`` sets where the test is most sensitive. It is given relative to the spread
of the unit-level outcome: ``τ = mixing_sd · σ`` with ``σ`` the pooled standard deviation per unit and
:data:`DEFAULT_MIXING_SD` = 0.2 (anticipated effects of about a fifth of a standard deviation). The
boundary on ``|d| / sqrt(V)`` is then lowest (about 3.0 instead of the fixed test's 1.96) near
``n_eff = 1/(1/n_a + 1/n_b) ≈ 8 / mixing_sd² = 200`` (about 400 units per arm at 50/50); it grows slowly
away from there (3.1 at ``n_eff`` 100, 3.3 at 50 or 3,200). In the simulation of :mod:`serving.ab.simulation`, 0.2
had clearly more power than 0.1 for experiments of 400 users and the same for 2,000.
``V`` and ``σ`` are plugged in from the data at each look (as Johari et al. do); looks start once
every arm has ``min_units`` units so that the variance estimates are not wildly off.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy import stats

__all__ = [
    "DEFAULT_MIXING_SD",
    "SEQUENTIAL_MIN_UNITS",
    "SequentialResult",
    "confidence_sequence_half_width",
    "minimum_detectable_effect",
    "msprt_log_likelihood_ratio",
    "sequential_minimum_detectable_effect",
    "sequential_test",
    "welch_looks",
]

DEFAULT_MIXING_SD = 0.2
"""Standard deviation of the mSPRT's normal mixing distribution, in pooled per-unit standard deviations."""

SEQUENTIAL_MIN_UNITS = 30
"""Looks before every arm has this many units are not counted (plug-in variances are too rough there)."""


@dataclass(frozen=True)
class SequentialResult:
    """The always-valid verdict of one treatment against the control, over all looks so far."""

    test: str
    """``"mSPRT (normal mixture)"``."""
    p_value: float
    """Always-valid p-value: the smallest ``1/Λ`` over the looks (1 before the first counted look)."""
    likelihood_ratio: float
    """``Λ`` at the latest look (the evidence now; the p-value keeps the strongest evidence seen)."""
    ci_low: float
    ci_high: float
    """Confidence sequence of the difference: covers it at every look at once with probability 1 - alpha."""
    alpha: float
    mixing_sd: float
    """Absolute ``τ`` at the latest look (``mixing_sd_ratio`` times the pooled per-unit standard deviation)."""
    mixing_sd_ratio: float
    looks: int
    """Looks counted (checkpoints at which every arm had at least ``min_units`` units)."""
    min_units: int

    @property
    def significant(self) -> bool:
        """True once the always-valid p-value fell below alpha (it never rises again)."""
        return self.p_value < self.alpha


def msprt_log_likelihood_ratio(
    difference: ArrayLike, variance: ArrayLike, mixing_variance: ArrayLike
) -> NDArray[np.float64]:
    """``ln Λ`` of the normal-mixture SPRT of ``θ = 0`` for an estimate ``difference`` of variance ``variance``.

    ``ln Λ = ½ ln(V / (V + τ²)) + τ² d² / (2 V (V + τ²))``; elementwise over arrays (the simulation
    calls it for a thousand experiments at once).
    """
    d, v, tau2 = (np.asarray(x, dtype=float) for x in (difference, variance, mixing_variance))
    with np.errstate(divide="ignore", invalid="ignore"):
        return 0.5 * np.log(v / (v + tau2)) + tau2 * d * d / (2 * v * (v + tau2))


def confidence_sequence_half_width(
    variance: ArrayLike, mixing_variance: ArrayLike, alpha: float
) -> NDArray[np.float64]:
    """Half-width of the mSPRT's ``1 - alpha`` confidence sequence around the estimated difference."""
    v, tau2 = np.asarray(variance, dtype=float), np.asarray(mixing_variance, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.sqrt(v * (v + tau2) / tau2 * (2 * math.log(1 / alpha) + np.log((v + tau2) / v)))


def minimum_detectable_effect(standard_error: float, alpha: float = 0.05, power: float = 0.8) -> float:
    """Smallest true difference a two-sided fixed-horizon test at ``alpha`` finds with ``power`` now.

    ``(z_{1-α/2} + z_power) · SE`` with SE the standard error of the difference at the current sample.
    """
    if not math.isfinite(standard_error) or standard_error <= 0:
        return math.nan
    return float((stats.norm.ppf(1 - alpha / 2) + stats.norm.ppf(power)) * standard_error)


def sequential_minimum_detectable_effect(
    variance: float, mixing_variance: float, alpha: float = 0.05, power: float = 0.8
) -> float:
    """Smallest true difference whose estimate would cross the mSPRT boundary now with ``power``.

    The boundary on ``|d|`` is the confidence-sequence half-width; add ``z_power`` standard errors.
    (A conservative figure: the boundary could also have been crossed at an earlier look.)
    """
    if not (math.isfinite(variance) and variance > 0 and mixing_variance > 0):
        return math.nan
    boundary = float(confidence_sequence_half_width(variance, mixing_variance, alpha))
    return boundary + float(stats.norm.ppf(power)) * math.sqrt(variance)


def sequential_test(
    differences: ArrayLike,
    variances: ArrayLike,
    pooled_sds: ArrayLike,
    *,
    alpha: float = 0.05,
    mixing_sd_ratio: float = DEFAULT_MIXING_SD,
    min_units: int = SEQUENTIAL_MIN_UNITS,
) -> SequentialResult | None:
    """The mSPRT over a series of looks (oldest first): ``difference``, its variance, pooled per-unit SD.

    Looks with a non-finite or zero variance are skipped. Returns None when no look counts.
    """
    d = np.asarray(differences, dtype=float)
    v = np.asarray(variances, dtype=float)
    tau = mixing_sd_ratio * np.asarray(pooled_sds, dtype=float)
    usable = np.isfinite(d) & np.isfinite(v) & (v > 0) & np.isfinite(tau) & (tau > 0)
    if not usable.any():
        return None
    d, v, tau = d[usable], v[usable], tau[usable]
    log_lr = msprt_log_likelihood_ratio(d, v, tau**2)
    half = confidence_sequence_half_width(v, tau**2, alpha)
    low, high = float(np.max(d - half)), float(np.min(d + half))
    if low > high:  # the running intersection emptied: the model is off; keep the latest interval only
        low, high = float(d[-1] - half[-1]), float(d[-1] + half[-1])
    p_value = float(min(1.0, math.exp(-float(np.max(log_lr)))))
    return SequentialResult(
        test="mSPRT (normal mixture)",
        p_value=p_value,
        likelihood_ratio=float(math.exp(min(float(log_lr[-1]), 700.0))),
        ci_low=low,
        ci_high=high,
        alpha=alpha,
        mixing_sd=float(tau[-1]),
        mixing_sd_ratio=mixing_sd_ratio,
        looks=int(d.size),
        min_units=min_units,
    )


def welch_looks(
    control: tuple[ArrayLike, ArrayLike, ArrayLike],
    treatment: tuple[ArrayLike, ArrayLike, ArrayLike],
    *,
    max_looks: int = 100,
    min_units: int = SEQUENTIAL_MIN_UNITS,
) -> tuple[NDArray[np.float64], NDArray[np.float64], NDArray[np.float64]]:
    """Replay the data as it arrived: difference, variance and pooled SD of unit means at each look.

    Each arm is ``(unit codes, times, values)``: one entry per outcome, ``unit codes`` ints naming its
    analysis unit (a user, or the request itself). At a look at time ``t`` a unit's value is the mean of
    its outcomes up to ``t``. Looks are the last outcome time and up to ``max_looks`` evenly spaced
    (by outcome count) times before it; only looks with ``min_units`` units in both arms are returned.
    More looks never hurt validity (the mSPRT allows continuous monitoring); they only let the running
    minimum of the p-value see evidence that was there earlier.
    """
    arms = [tuple(np.asarray(x) for x in arm) for arm in (control, treatment)]
    all_times = np.sort(np.concatenate([arm[1] for arm in arms]).astype(float))
    if all_times.size == 0:
        empty = np.empty(0)
        return empty, empty, empty
    picks = np.ceil(np.linspace(0, all_times.size - 1, min(max_looks, all_times.size))).astype(int)
    checkpoints = np.unique(all_times[picks])
    moments = [
        _unit_moments_at(codes, times.astype(float), values.astype(float), checkpoints)
        for codes, times, values in arms
    ]
    (n_a, mean_a, var_a), (n_b, mean_b, var_b) = moments
    with np.errstate(divide="ignore", invalid="ignore"):
        difference = mean_b - mean_a
        variance = var_a / n_a + var_b / n_b
        pooled = np.sqrt(((n_a - 1) * var_a + (n_b - 1) * var_b) / (n_a + n_b - 2))
    ready = (n_a >= max(min_units, 2)) & (n_b >= max(min_units, 2))
    return difference[ready], variance[ready], pooled[ready]


def _unit_moments_at(
    codes: NDArray, times: NDArray[np.float64], values: NDArray[np.float64], checkpoints: NDArray[np.float64]
) -> tuple[NDArray[np.float64], NDArray[np.float64], NDArray[np.float64]]:
    """Number of units, mean and sample variance of the unit means, at each checkpoint time."""
    order = np.argsort(times, kind="stable")
    _, codes = np.unique(np.asarray(codes)[order], return_inverse=True)
    times, values = times[order], values[order]
    ends = np.searchsorted(times, checkpoints, side="right")
    n, mean, var = (np.full(checkpoints.size, np.nan) for _ in range(3))
    size = int(codes.max()) + 1 if codes.size else 0
    for index, end in enumerate(ends):
        counts = np.bincount(codes[:end], minlength=size)
        seen = counts > 0
        unit_means = np.bincount(codes[:end], values[:end], minlength=size)[seen] / counts[seen]
        n[index] = unit_means.size
        if unit_means.size:
            mean[index] = unit_means.mean()
        if unit_means.size > 1:
            var[index] = unit_means.var(ddof=1)
    return n, mean, var
