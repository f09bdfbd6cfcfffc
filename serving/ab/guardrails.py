"""Guardrails of an A/B experiment and its traffic ramp: the grammar and the always-valid decision.

A guardrail is a limit the treatment arm must respect while the experiment runs; the gateways check it
every few seconds (:mod:`serving.guard_monitor`) and, once a breach is *sequentially significant*, stop
the experiment and send all traffic back to the control arm. Grammar (no spaces needed)::

    GUARDRAIL := METRIC OP BOUND
    METRIC    := error_rate | thumbs | reward | mean_latency_ms | pNN_latency_ms   (NN = 1..99: p50, p95, p99)
    OP        := <=   the treatment must stay at or below the limit
               | >=   the treatment must stay at or above the limit
    BOUND     := NUMBER         absolute: the limit is NUMBER               error_rate<=0.02, p95_latency_ms<=800
               | NUMBER x       relative: NUMBER times the control's value  p95_latency_ms<=1.2x
               | +NUMBER | -NUMBER  difference: control's value + NUMBER     thumbs>=-0.05, error_rate<=+0.01
                                (rate and mean metrics only; the sign is what marks a difference)

Metrics, per arm, over the requests logged under the experiment (shadow copies left out):

- ``error_rate``: share of requests answered with status ≥ 500 (engine or gateway failures; a client's
  4xx is not the version's fault);
- ``thumbs``: thumbs-up rate, ``reward``: mean reward (latest outcome per request, from ``/v1/feedback``);
- ``mean_latency_ms``, ``pNN_latency_ms``: latency of the requests that did not fail (status < 500).

Decision. Rates and means are compared per analysis unit (a user; a request without a user is a unit
of its own), like the A/B report. The quantity ``excess = treatment - limit`` (``T - B``, ``T - k·C`` or
``T - C - δ``) is estimated with its Welch variance and given the normal-mixture confidence sequence of
:mod:`serving.ab.sequential` (mSPRT, Johari et al.); for the two 0/1 metrics each arm's variance is
floored at the binomial variance of the smoothed rate ``(k+1)/(m+2)`` so an arm that has shown no error
yet is not taken as certain. Quantiles use the confidence sequence of Howard and Ramdas ("Sequential
estimation of quantiles with applications to A/B-testing", 2022): the number of latencies at or below
the true p-quantile is Binomial(n, p), a beta-binomial mixture of its likelihood ratios is a martingale
(exact, no plug-in), and the counts it does not reject give order statistics that cover the quantile at
every check with probability ≥ 1 - alpha (:func:`quantile_confidence_sequence`); a relative bound compares
the treatment's interval with ``k`` times the control's (each at alpha/2). A guardrail ``<=`` is breached when the whole confidence
sequence of the excess lies above 0 (``>=``: below 0). Because the sequences hold at every check at once,
checking every few seconds for weeks trips a guardrail that truly holds with probability ≤ alpha
(split Bonferroni over the guardrails and treatment arms); the plug-in variances make this approximate
for small samples, hence no check before each arm has ``min_units`` units.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

import numpy as np
from scipy.special import betaln

from .assign import ABError
from .sequential import DEFAULT_MIXING_SD, confidence_sequence_half_width

if TYPE_CHECKING:  # the registry's views; any object with the same fields works
    from registry.views import ExperimentView, OutcomeRecord, RequestRecord

__all__ = [
    "DEFAULT_SETTINGS",
    "Guardrail",
    "GuardrailCheck",
    "breach_reason",
    "breached_guardrail",
    "check_guardrails",
    "guard_settings",
    "parse_guardrail",
    "parse_ramp",
    "quantile_confidence_sequence",
    "ramp_due",
    "treatment_share",
]

DEFAULT_SETTINGS: dict[str, float] = {
    "alpha": 0.01,
    "min_units": 30,
    "step_s": 3600.0,
    "step_units": 100,
}
"""alpha: chance, over the whole experiment and all its guardrails, of stopping on a guardrail that holds;
min_units: units (users, quantiles: requests) each compared arm needs before its guardrails are judged;
step_s and step_units: a ramp step lasts at least step_s seconds and until the treatment has had
step_units units (users, or requests without a user) during the step."""

ERROR_STATUS = 500
"""Requests with a status at or above this count as errors."""

_RATE_METRICS = ("error_rate", "thumbs")
_MEAN_METRICS = ("reward", "mean_latency_ms")
_QUANTILE = re.compile(r"p([1-9][0-9]?)_latency_ms")
_SPEC = re.compile(
    r"(?P<metric>[a-z0-9_]+)(?P<op><=|>=)(?P<bound>[+-]?(\d+\.?\d*|\.\d+)(e[+-]?\d+)?)(?P<x>x?)"
)
METRIC_NAMES = "error_rate, thumbs, reward, mean_latency_ms, pNN_latency_ms (e.g. p95_latency_ms)"


@dataclass(frozen=True)
class Guardrail:
    """One parsed guardrail: ``metric op bound`` with a mode saying what the bound is relative to."""

    metric: str
    op: str
    """``<=`` or ``>=``."""
    mode: str
    """``absolute`` | ``factor`` (times the control) | ``difference`` (control plus)."""
    bound: float

    @property
    def text(self) -> str:
        """The canonical spec (what is stored and shown)."""
        number = f"{self.bound:+g}" if self.mode == "difference" else f"{self.bound:g}"
        return f"{self.metric}{self.op}{number}{'x' if self.mode == 'factor' else ''}"

    @property
    def quantile(self) -> float | None:
        """0.95 for ``p95_latency_ms``; None for rates and means."""
        match = _QUANTILE.fullmatch(self.metric)
        return int(match.group(1)) / 100 if match else None

    @property
    def needs_control(self) -> bool:
        return self.mode != "absolute"


def parse_guardrail(spec: str) -> Guardrail:
    """Parse ``error_rate<=0.02`` / ``p95_latency_ms<=1.2x`` / ``thumbs>=-0.05``; ABError says what is wrong."""
    text = "".join(spec.split()).lower()
    match = _SPEC.fullmatch(text)
    if match is None:
        raise ABError(
            f"guardrail {spec!r} is not METRIC<=BOUND or METRIC>=BOUND with BOUND a number, a factor like "
            "1.2x or a signed difference like -0.05 (example: --guardrail error_rate<=0.02)"
        )
    metric, op, raw = match["metric"], match["op"], match["bound"]
    bound, signed, factor = float(raw), raw[0] in "+-", bool(match["x"])
    if metric not in _RATE_METRICS + _MEAN_METRICS and not _QUANTILE.fullmatch(metric):
        raise ABError(f"guardrail {spec!r}: unknown metric {metric!r}; use one of {METRIC_NAMES}")
    if factor and (signed or bound <= 0):
        raise ABError(f"guardrail {spec!r}: a factor is an unsigned number above 0, like 1.2x")
    if signed and _QUANTILE.fullmatch(metric):
        raise ABError(
            f"guardrail {spec!r}: a quantile takes an absolute bound (800) or a factor (1.2x), not a difference"
        )
    if not math.isfinite(bound):
        raise ABError(f"guardrail {spec!r}: the bound must be finite")
    mode = "factor" if factor else "difference" if signed else "absolute"
    if mode == "absolute" and metric in _RATE_METRICS and not 0 <= bound <= 1:
        raise ABError(f"guardrail {spec!r}: {metric} is a rate; an absolute bound lies in [0, 1]")
    if mode == "absolute" and metric.endswith("_latency_ms") and bound < 0:
        raise ABError(f"guardrail {spec!r}: a latency bound is at least 0 ms")
    return Guardrail(metric, op, mode, bound)


def parse_ramp(text: str) -> list[float]:
    """``"1,5,25,50"`` → ``[1.0, 5.0, 25.0, 50.0]``: increasing treatment shares in percent, in (0, 100]."""
    try:
        shares = [float(part) for part in text.split(",")]
    except ValueError:
        shares = []
    if (
        not shares
        or any(not (math.isfinite(s) and 0 < s <= 100) for s in shares)
        or any(b <= a for a, b in zip(shares, shares[1:], strict=False))
    ):
        raise ABError(
            f"ramp {text!r} is not increasing treatment percentages in (0, 100] separated by commas "
            "(example: --ramp 1,5,25,50)"
        )
    return shares


def guard_settings(experiment: ExperimentView) -> dict[str, float]:
    """The experiment's settings over :data:`DEFAULT_SETTINGS`."""
    return {**DEFAULT_SETTINGS, **(getattr(experiment, "guard_settings", None) or {})}


def treatment_share(experiment: ExperimentView) -> float:
    """Percent of the traffic the arms after the first (the treatments) get."""
    total = sum(arm.weight for arm in experiment.arms) or 1.0
    return 100.0 * sum(arm.weight for arm in experiment.arms[1:]) / total


# ---------------------------------------------------------------------------------------------- data


@dataclass
class _Arm:
    """What one arm's guardrails are judged on."""

    units: dict[str, dict[str, list[float]]]
    """unit key → metric → values of its requests (errors 0/1, latencies, thumbs 0/1, rewards)."""
    latencies: list[float]
    """Latency of every request that did not fail (quantiles are per request)."""

    def unit_means(self, metric: str) -> np.ndarray:
        return np.asarray([float(np.mean(v[metric])) for v in self.units.values() if v.get(metric)])

    def raw(self, metric: str) -> np.ndarray:
        return np.asarray([x for v in self.units.values() for x in v.get(metric, ())], dtype=float)


def _arms(
    requests: Iterable[RequestRecord], outcomes: Iterable[OutcomeRecord], versions: Sequence[int]
) -> dict[int, _Arm]:
    latest: dict[str, OutcomeRecord] = {}
    for outcome in outcomes:
        seen = latest.get(outcome.request_id)
        if seen is None or outcome.created_at >= seen.created_at:
            latest[outcome.request_id] = outcome
    arms = {v: _Arm(defaultdict(lambda: defaultdict(list)), []) for v in versions}
    for request in requests:
        arm = arms.get(request.version) if not request.shadow and request.version is not None else None
        if arm is None:
            continue
        unit = arm.units[f"user:{request.user}" if request.user else f"request:{request.request_id}"]
        failed = request.status_code >= ERROR_STATUS
        unit["error_rate"].append(1.0 if failed else 0.0)
        if not failed:
            unit["mean_latency_ms"].append(float(request.latency_ms))
            arm.latencies.append(float(request.latency_ms))
        outcome = latest.get(request.request_id)
        if outcome is not None and outcome.thumbs is not None:
            unit["thumbs"].append(1.0 if outcome.thumbs else 0.0)
        if outcome is not None and outcome.reward is not None and math.isfinite(outcome.reward):
            unit["reward"].append(float(outcome.reward))
    return arms


# ------------------------------------------------------------------------------------------ decision


@dataclass(frozen=True)
class GuardrailCheck:
    """One guardrail of one treatment arm at one check."""

    guardrail: Guardrail
    version: int
    """The treatment arm checked."""
    status: str
    """``ok`` | ``breached`` | ``waiting`` (too few units to judge)."""
    treatment: float
    """The treatment's value (point estimate)."""
    limit: float
    """The limit it is held to now: the bound, k × control or control + δ (point estimate)."""
    excess_low: float
    excess_high: float
    """Confidence sequence of ``treatment - limit`` (always valid at level alpha)."""
    units: tuple[int, int]
    """Units (quantiles: requests) of (control, treatment)."""
    alpha: float

    @property
    def breached(self) -> bool:
        return self.status == "breached"


def _moments(values: np.ndarray) -> tuple[float, float]:
    """Mean and sample variance of the unit values."""
    return float(values.mean()), float(values.var(ddof=1)) if values.size > 1 else math.nan


def _binary_floor(arm: _Arm, metric: str) -> float:
    """Binomial variance of the smoothed rate ``(k+1)/(m+2)``, per unit of ``m/units`` requests."""
    raw = arm.raw(metric)
    units = max(1, sum(1 for v in arm.units.values() if v.get(metric)))
    smoothed = (raw.sum() + 1) / (raw.size + 2)
    return float(smoothed * (1 - smoothed) / max(1.0, raw.size / units))


def _mean_excess(
    rail: Guardrail, control: _Arm, treatment: _Arm, alpha: float, mixing_sd: float, min_units: int
) -> tuple[float, float, float, float, tuple[int, int]] | None:
    """(treatment, limit, excess low, excess high, units) for a rate or mean metric; None: too few units."""
    binary = rail.metric in _RATE_METRICS
    t_values, c_values = treatment.unit_means(rail.metric), control.unit_means(rail.metric)
    units = (int(c_values.size), int(t_values.size))
    if t_values.size < max(min_units, 2) or (rail.needs_control and c_values.size < max(min_units, 2)):
        return None
    t_mean, t_var = _moments(t_values)
    if binary:
        t_var = max(t_var, _binary_floor(treatment, rail.metric))
    variance, pooled_var = t_var / t_values.size, t_var
    if rail.mode == "absolute":
        limit, weight = rail.bound, 0.0
    else:
        c_mean, c_var = _moments(c_values)
        if binary:
            c_var = max(c_var, _binary_floor(control, rail.metric))
        weight = rail.bound if rail.mode == "factor" else 1.0
        limit = weight * c_mean + (rail.bound if rail.mode == "difference" else 0.0)
        variance += weight**2 * c_var / c_values.size
        n_t, n_c = t_values.size, c_values.size
        pooled_var = ((n_t - 1) * t_var + (n_c - 1) * c_var) / (n_t + n_c - 2)
    if not (math.isfinite(variance) and variance > 0 and pooled_var > 0):
        return None
    half = float(confidence_sequence_half_width(variance, (mixing_sd**2) * pooled_var, alpha))
    excess = t_mean - limit
    return t_mean, limit, excess - half, excess + half, units


QUANTILE_PRIOR_SIZE = 20.0
"""Concentration ``a + b`` of the beta mixing distribution of the quantile test, centred on ``p``."""


def quantile_confidence_sequence(
    values: Sequence[float] | np.ndarray, p: float, alpha: float, prior_size: float = QUANTILE_PRIOR_SIZE
) -> tuple[float, float]:
    """Always-valid ``1 - alpha`` interval for the p-quantile of iid ``values`` (order statistics).

    ``S``, the number of values at or below the true quantile, is Binomial(n, p); the beta-binomial
    mixture of likelihood ratios ``B(a + S, b + n - S) / B(a, b) / (p^S (1-p)^(n-S))`` with
    ``a = p · prior_size``, ``b = (1 - p) · prior_size`` is a nonnegative martingale, so with probability
    ≥ 1 - alpha it stays below ``1/alpha`` for all n at once (Ville). The counts ``s`` it accepts form
    ``[s_lo, s_hi]``, hence ``x_(s_lo) ≤ q < x_(s_hi + 1)``; a bound beyond the sample is ``∓inf``.
    """
    x = np.sort(np.asarray(values, dtype=float))
    n = x.size
    if n == 0:
        return -math.inf, math.inf
    a, b = p * prior_size, (1 - p) * prior_size
    s = np.arange(n + 1, dtype=float)
    log_lr = betaln(a + s, b + n - s) - betaln(a, b) - s * math.log(p) - (n - s) * math.log1p(-p)
    accepted = np.flatnonzero(log_lr < math.log(1 / alpha))
    if accepted.size == 0:  # cannot happen for a sensible alpha: the count near n·p is always accepted
        return -math.inf, math.inf
    s_low, s_high = int(accepted[0]), int(accepted[-1])
    low = float(x[s_low - 1]) if s_low >= 1 else -math.inf
    high = float(x[s_high]) if s_high + 1 <= n else math.inf
    return low, high


def _quantile_excess(
    rail: Guardrail, control: _Arm, treatment: _Arm, alpha: float, mixing_sd: float, min_units: int
) -> tuple[float, float, float, float, tuple[int, int]] | None:
    p = rail.quantile or 0.5
    units = (len(control.latencies), len(treatment.latencies))
    if units[1] < min_units or (rail.needs_control and units[0] < min_units):
        return None
    t_point = float(np.quantile(treatment.latencies, p))
    if rail.mode == "absolute":
        t_low, t_high = quantile_confidence_sequence(treatment.latencies, p, alpha)
        return t_point, rail.bound, t_low - rail.bound, t_high - rail.bound, units
    t_low, t_high = quantile_confidence_sequence(treatment.latencies, p, alpha / 2)
    c_low, c_high = quantile_confidence_sequence(control.latencies, p, alpha / 2)
    k = rail.bound
    limit = k * float(np.quantile(control.latencies, p))
    return t_point, limit, t_low - k * c_high, t_high - k * c_low, units


def check_guardrails(
    experiment: ExperimentView,
    requests: Iterable[RequestRecord],
    outcomes: Iterable[OutcomeRecord] = (),
    *,
    alpha: float | None = None,
    mixing_sd: float = DEFAULT_MIXING_SD,
    min_units: int | None = None,
) -> list[GuardrailCheck]:
    """Every guardrail of every treatment arm (arms after the first) against the control (the first arm).

    ``alpha`` (default: the experiment's setting) is split evenly over guardrails × treatment arms.
    Raises ABError when a stored guardrail does not parse.
    """
    settings = guard_settings(experiment)
    alpha = float(settings["alpha"] if alpha is None else alpha)
    min_units = int(settings["min_units"] if min_units is None else min_units)
    rails = [parse_guardrail(spec) for spec in experiment.guardrails]
    versions = [arm.version for arm in experiment.arms]
    if not rails or len(versions) < 2:
        return []
    arms = _arms(requests, outcomes, versions)
    each = alpha / (len(rails) * (len(versions) - 1))
    checks = []
    for version in versions[1:]:
        for rail in rails:
            judge = _quantile_excess if rail.quantile is not None else _mean_excess
            found = judge(rail, arms[versions[0]], arms[version], each, mixing_sd, min_units)
            if found is None:
                units = (len(arms[versions[0]].units), len(arms[version].units))
                checks.append(GuardrailCheck(rail, version, "waiting", math.nan, math.nan, -math.inf,
                                             math.inf, units, each))  # fmt: skip
                continue
            value, limit, low, high, units = found
            breached = low > 0 if rail.op == "<=" else high < 0
            status = "breached" if breached else "ok"
            checks.append(GuardrailCheck(rail, version, status, value, limit, low, high, units, each))
    return checks


def breach_reason(experiment: ExperimentView, check: GuardrailCheck) -> str:
    """The stop reason recorded in the experiment and the alias history (starts ``guardrail SPEC breached``)."""
    rail, control = check.guardrail, experiment.arms[0].version
    side = "above" if rail.op == "<=" else "below"
    return (
        f"guardrail {rail.text} breached by {experiment.expert}@{check.version} in experiment "
        f"{experiment.id}: {rail.metric} {check.treatment:.4g} vs limit {check.limit:.4g} "
        f"(units control {check.units[0]}, treatment {check.units[1]}); the always-valid "
        f"{1 - check.alpha:.4g} confidence sequence of the excess [{check.excess_low:.4g}, "
        f"{check.excess_high:.4g}] lies {side} 0; all traffic back to control {experiment.expert}@{control}"
    )


_REASON = re.compile(r"guardrail (\S+) breached")


def breached_guardrail(reason: str) -> str | None:
    """The guardrail spec a :func:`breach_reason` names (None for any other stop)."""
    match = _REASON.match(reason or "")
    return match.group(1) if match else None


def ramp_due(experiment: ExperimentView, requests: Iterable[RequestRecord], now: datetime) -> bool:
    """True when the ramp's current step has lasted ``step_s`` and the treatment had ``step_units``
    units (users, or requests without a user) in it, and a next step exists."""
    ramp: list[float] = list(getattr(experiment, "ramp", None) or [])
    step = int(getattr(experiment, "ramp_step", 0))
    started = getattr(experiment, "step_started_at", None)
    if step + 1 >= len(ramp) or started is None or len(experiment.arms) != 2:
        return False
    settings = guard_settings(experiment)
    if (now - started).total_seconds() < settings["step_s"]:
        return False
    treatment = experiment.arms[1].version
    units: set[Any] = set()
    for request in requests:
        if request.version == treatment and not request.shadow and request.created_at >= started:
            units.add(f"user:{request.user}" if request.user else request.request_id)
    return len(units) >= settings["step_units"]
