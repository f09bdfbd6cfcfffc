"""One treatment arm against the control: fixed-horizon test, always-valid sequential test, MDEs."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .samples import unit_values
from .sequential import (
    SequentialResult,
    minimum_detectable_effect,
    sequential_minimum_detectable_effect,
    sequential_test,
    welch_looks,
)
from .stats import SignificanceResult, two_proportion_z_test, welch_t_test

__all__ = ["MAX_LOOKS", "Comparison", "compare_arms"]

MAX_LOOKS = 100
"""Checkpoints the sequential test replays the data at (see :func:`serving.ab.sequential.welch_looks`)."""


@dataclass(frozen=True)
class Comparison:
    """One treatment arm against the control arm."""

    control: int
    treatment: int
    result: SignificanceResult | None
    """None while either arm has too few outcomes to run the test at all."""
    alpha: float
    """Significance level after the Bonferroni correction for several treatment arms."""
    sequential: SequentialResult | None = None
    """The always-valid mSPRT over all looks so far; None before both arms have enough units."""
    verdict: str = "sequential"
    """Which test :attr:`significant` follows: ``sequential`` (valid under peeking) or ``fixed``."""
    mde: float = math.nan
    """Minimum detectable effect of the fixed-horizon test now (alpha, power 0.8, the unit in use)."""
    mde_sequential: float = math.nan
    """Minimum detectable effect of the sequential test now (its boundary plus 0.84 standard errors)."""

    @property
    def fixed_significant(self) -> bool:
        """True when the fixed-horizon test ran and rejected equality at :attr:`alpha` (valid for one look)."""
        return self.result is not None and self.result.p_value < self.alpha

    @property
    def significant(self) -> bool:
        """True when the test of :attr:`verdict` rejected equality at :attr:`alpha`."""
        if self.verdict == "fixed":
            return self.fixed_significant
        return self.sequential is not None and self.sequential.p_value < self.alpha

    @property
    def p_value(self) -> float:
        """The p-value of :attr:`verdict` (1 when that test has not run)."""
        if self.verdict == "fixed":
            return self.result.p_value if self.result is not None else 1.0
        return self.sequential.p_value if self.sequential is not None else 1.0

    @property
    def interval(self) -> tuple[float, float]:
        """The difference's interval of :attr:`verdict`: confidence interval or confidence sequence."""
        source = self.result if self.verdict == "fixed" else self.sequential
        return (source.ci_low, source.ci_high) if source is not None else (math.nan, math.nan)


def compare_arms(
    control: int,
    treatment: int,
    samples: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]],
    proportions: bool,
    alpha: float,
    confidence: float,
    verdict: str,
    mixing_sd: float,
) -> Comparison:
    """Fixed-horizon test, the sequential test over the replayed looks, and both MDEs, at ``alpha``."""
    a, b = unit_values(samples[control]), unit_values(samples[treatment])
    result: SignificanceResult | None = None
    if proportions and a and b:
        result = two_proportion_z_test(int(sum(a)), len(a), int(sum(b)), len(b), confidence)
    elif not proportions and len(a) >= 2 and len(b) >= 2:
        result = welch_t_test(a, b, confidence)
    differences, variances, pooled_sds = welch_looks(
        samples[control], samples[treatment], max_looks=MAX_LOOKS
    )
    sequential = sequential_test(differences, variances, pooled_sds, alpha=alpha, mixing_sd_ratio=mixing_sd)
    mde = mde_sequential = math.nan
    if len(a) >= 2 and len(b) >= 2:
        variance = float(np.var(a, ddof=1) / len(a) + np.var(b, ddof=1) / len(b))
        pooled_variance = ((len(a) - 1) * np.var(a, ddof=1) + (len(b) - 1) * np.var(b, ddof=1)) / (
            len(a) + len(b) - 2
        )
        mde = minimum_detectable_effect(math.sqrt(variance), alpha)
        mde_sequential = sequential_minimum_detectable_effect(
            variance, float(mixing_sd**2 * pooled_variance), alpha
        )
    return Comparison(control, treatment, result, alpha, sequential, verdict, mde, mde_sequential)
