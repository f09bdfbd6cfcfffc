"""A/B experiments between versions of one expert: sticky assignment, statistics, report and plot.

Assignment is the only part on the request path (:func:`assign_arm`): sha256(salt, user) picks one of
:data:`NUM_BUCKETS` buckets and the arms own contiguous bucket ranges in proportion to their weights,
so a user stays on the same arm for the life of the experiment (and across gateway replicas), while a
request without a user is assigned at random.

Everything else runs off the request path, on what the gateway logged through
:mod:`serving.request_log`: :func:`build_report` joins requests with their outcomes per arm,
compares every treatment arm with the control arm (the first arm configured, normally the current
prod version) with the test that fits the metric, two-sided two-proportion z-test for ``thumbs`` and
Welch's t-test for ``reward``, checks the traffic split for sample-ratio mismatch (chi-square against
the configured weights) and only then recommends a winner.

The statistics are written out (pooled standard error, Welch–Satterthwaite degrees of freedom, …) and
use ``scipy.stats`` only for the distributions, so the logic can be read and the tests check each
function against scipy's own implementation.
"""

from __future__ import annotations

import functools
import hashlib
import io
import math
import random
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
from scipy import stats

from registry.experiment_metrics import EXPERIMENT_METRICS as METRICS

if TYPE_CHECKING:  # the registry's views; any object with the same fields works
    from registry.models import ExperimentView, OutcomeRecord, RequestRecord

__all__ = [
    "NUM_BUCKETS",
    "ABError",
    "ABReport",
    "ArmStats",
    "Comparison",
    "MeanCI",
    "Recommendation",
    "SRMResult",
    "SignificanceResult",
    "assign_arm",
    "build_report",
    "compute_report",
    "mean_confidence_interval",
    "parse_arm",
    "plot_report",
    "proportion_confidence_interval",
    "render_report",
    "srm_check",
    "two_proportion_z_test",
    "user_bucket",
    "welch_t_test",
]

NUM_BUCKETS = 10_000
"""Assignment granularity: weights are honoured to 0.01 %."""

SRM_ALPHA = 0.001
"""Sample-ratio mismatch is flagged below this p-value (the usual, deliberately strict threshold)."""

UNITS = ("request", "user")
"""Analysis units of :func:`compute_report`."""


class ABError(ValueError):
    """An A/B experiment setting or request is invalid; the message says how to fix it."""


# --------------------------------------------------------------------------------------------------
# What this module reads from the registry.
# --------------------------------------------------------------------------------------------------


class ExperimentRegistry(Protocol):
    """The registry methods :func:`build_report` calls."""

    def get_experiment(self, expert_or_id: str | int) -> Any: ...

    def experiment_requests(self, experiment_id: int) -> list[Any]: ...

    def experiment_outcomes(self, experiment_id: int) -> list[Any]: ...


# --------------------------------------------------------------------------------------------------
# Assignment (request path)
# --------------------------------------------------------------------------------------------------

_anonymous_rng = random.Random()  # seeded from os.urandom; only for requests without a user


def parse_arm(spec: str) -> tuple[int, float]:
    """Parse a CLI arm ``"VERSION:WEIGHT"`` (e.g. ``"4:10"``) into ``(4, 10.0)``."""
    version_text, sep, weight_text = spec.partition(":")
    try:
        version, weight = int(version_text), float(weight_text)
    except ValueError:
        version, weight = -1, math.nan
    if not sep or version < 1 or not math.isfinite(weight) or weight <= 0:
        raise ABError(
            f"arm {spec!r} is not VERSION:WEIGHT with VERSION ≥ 1 and WEIGHT > 0 (example: --arm 4:10)"
        )
    return version, weight


def validate_arms(arms: Sequence[tuple[int, float]]) -> None:
    """Raise :class:`ABError` unless the arms have distinct versions and a positive total weight."""
    versions = [version for version, _ in arms]
    if len(set(versions)) != len(versions):
        raise ABError(f"arm versions must be distinct, got {versions}; give each version one --arm")
    if not arms or sum(weight for _, weight in arms) <= 0:
        raise ABError("the arms' weights must add up to more than 0 (example: --arm 3:90 --arm 4:10)")


def user_bucket(salt: str, user: str) -> int:
    """The bucket in ``[0, NUM_BUCKETS)`` of ``user`` under ``salt``: stable across processes and hosts.

    sha256 (not Python's per-process salted ``hash``) over ``salt``, a unit separator and ``user``;
    the separator keeps ``("ab", "c")`` and ``("a", "bc")`` apart. The modulo bias of a 64-bit value
    reduced to 10,000 buckets is below 1e-15.
    """
    digest = hashlib.sha256(f"{salt}\x1f{user}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % NUM_BUCKETS


@functools.lru_cache(maxsize=256)
def _bucket_bounds(arms: tuple[tuple[int, float], ...]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Upper bucket bound (exclusive) of each arm, in arm order, and the arms' versions."""
    total = sum(weight for _, weight in arms)
    if total <= 0:
        raise ABError("experiment has no arm with a positive weight; stop it and start a new one")
    bounds, cumulative = [], 0.0
    for _, weight in arms:
        cumulative += weight
        bounds.append(round(cumulative / total * NUM_BUCKETS))
    bounds[-1] = NUM_BUCKETS
    return tuple(bounds), tuple(version for version, _ in arms)


def experiment_salt(experiment: ExperimentView) -> str:
    """The salt assignment hashes with: the experiment's own, else one unique to the experiment."""
    return experiment.salt or f"{experiment.expert}:{experiment.id}"


def assign_arm(experiment: ExperimentView, user: str | None) -> int:
    """The expert version that serves ``user`` in ``experiment`` (pure and cheap: call per request).

    A user always gets the same version for a given salt and set of weights; ``None`` (or an empty
    string) means no user is known and the version is drawn at random for this request only. The
    shadow version is never returned here: it receives copies, not assignments.
    """
    arms = tuple((int(arm.version), float(arm.weight)) for arm in experiment.arms)
    bounds, versions = _bucket_bounds(arms)
    # No user: a fresh draw per request (nothing to be sticky to).
    bucket = user_bucket(experiment_salt(experiment), user) if user else _anonymous_rng.randrange(NUM_BUCKETS)
    for bound, version in zip(bounds, versions, strict=True):
        if bucket < bound:
            return version
    return versions[-1]  # unreachable: the last bound is NUM_BUCKETS


# --------------------------------------------------------------------------------------------------
# Statistics
# --------------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ArmStats:
    """What one arm (or the shadow version) saw during the experiment."""

    version: int
    ref: str
    """``name@version``."""
    weight: float
    """Configured share of traffic, 0..1 (0 for the shadow)."""
    requests: int
    users: int
    """Distinct known users."""
    units: int
    """Assignment units: distinct users plus requests without a user (what the split is checked on)."""
    errors: int
    """Requests answered with status ≥ 400."""
    latency_p50_ms: float
    latency_p95_ms: float
    prompt_tokens: int
    completion_tokens: int
    metric: MeanCI
    """Mean reward, or thumbs-up rate, over requests with an outcome (the latest outcome per request)."""
    shadow: bool = False


@dataclass(frozen=True)
class Comparison:
    """One treatment arm against the control arm."""

    control: int
    treatment: int
    result: SignificanceResult | None
    """None while either arm has too few outcomes to run the test at all."""
    alpha: float
    """Significance level after the Bonferroni correction for several treatment arms."""

    @property
    def significant(self) -> bool:
        """True when the test ran and rejected equality at :attr:`alpha`."""
        return self.result is not None and self.result.p_value < self.alpha


@dataclass(frozen=True)
class Recommendation:
    """What to do next, and why."""

    decision: str
    """``srm`` | ``no-data`` | ``insufficient-data`` | ``winner`` | ``keep-control`` | ``no-difference``."""
    winner: int | None
    text: str


@dataclass(frozen=True)
class ABReport:
    """Everything ``moea ab report`` shows; plain data (``to_dict`` is JSON-ready)."""

    experiment_id: int
    expert: str
    metric: str
    status: str
    salt: str
    started_at: datetime | None
    stopped_at: datetime | None
    winner: int | None
    arms: list[ArmStats]
    """Configured arms in order; the first is the control."""
    shadow: ArmStats | None
    comparisons: list[Comparison]
    srm: SRMResult
    recommendation: Recommendation
    min_samples: int
    alpha: float
    unit: str = "request"
    """Analysis unit: ``request`` or ``user`` (see :func:`compute_report`)."""
    other_requests: int = 0
    """Requests logged under the experiment on a version that is not an arm (left out; should be 0)."""
    generated_at: datetime = field(default_factory=lambda: datetime.now(UTC))

    @property
    def control(self) -> ArmStats:
        """The control arm (the first configured)."""
        return self.arms[0]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (datetimes as ISO 8601, NaN/inf as None)."""
        return _json_ready(asdict(self))


def _json_ready(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _json_ready(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_json_ready(item) for item in value]
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _latest_outcomes(outcomes: Iterable[OutcomeRecord], metric: str) -> dict[str, float]:
    """request_id → the value of its latest outcome for ``metric`` (feedback may be corrected)."""
    latest: dict[str, tuple[datetime, float]] = {}
    for outcome in outcomes:
        raw = outcome.reward if metric == "reward" else outcome.thumbs
        if raw is None:
            continue
        value = float(raw)
        if metric == "reward" and not math.isfinite(value):
            continue
        seen = latest.get(outcome.request_id)
        if seen is None or outcome.created_at >= seen[0]:
            latest[outcome.request_id] = (outcome.created_at, value)
    return {request_id: value for request_id, (_, value) in latest.items()}


def _outcome_values(
    requests: list[RequestRecord], outcome_by_request: dict[str, float], unit: str
) -> list[float]:
    """The samples an arm is judged on: one per request with an outcome, or one mean per user."""
    if unit == "request":
        return [outcome_by_request[r.request_id] for r in requests if r.request_id in outcome_by_request]
    per_unit: dict[str, list[float]] = {}
    for request in requests:
        if request.request_id in outcome_by_request:
            # Requests without a user are their own unit: they were assigned one by one.
            key = f"user:{request.user}" if request.user else f"request:{request.request_id}"
            per_unit.setdefault(key, []).append(outcome_by_request[request.request_id])
    return [float(np.mean(samples)) for samples in per_unit.values()]


def _arm_stats(
    ref: str,
    version: int,
    weight: float,
    requests: list[RequestRecord],
    values: list[float],
    proportions: bool,
    confidence: float,
    shadow: bool = False,
) -> ArmStats:
    users = {request.user for request in requests if request.user}
    anonymous = sum(1 for request in requests if not request.user)
    latencies = np.asarray([request.latency_ms for request in requests], dtype=float)
    p50, p95 = np.percentile(latencies, [50, 95]).tolist() if latencies.size else [math.nan, math.nan]
    if proportions:
        metric_ci = proportion_confidence_interval(int(sum(values)), len(values), confidence)
    else:
        metric_ci = mean_confidence_interval(values, confidence)
    return ArmStats(
        version=version,
        ref=ref,
        weight=weight,
        requests=len(requests),
        users=len(users),
        units=len(users) + anonymous,
        errors=sum(1 for request in requests if request.status_code >= 400),
        latency_p50_ms=float(p50),
        latency_p95_ms=float(p95),
        prompt_tokens=int(sum(request.prompt_tokens for request in requests)),
        completion_tokens=int(sum(request.completion_tokens for request in requests)),
        metric=metric_ci,
        shadow=shadow,
    )


def _compare(
    control: int,
    treatment: int,
    values: dict[int, list[float]],
    proportions: bool,
    alpha: float,
    confidence: float,
) -> Comparison:
    a, b = values[control], values[treatment]
    result: SignificanceResult | None = None
    if proportions and a and b:
        result = two_proportion_z_test(int(sum(a)), len(a), int(sum(b)), len(b), confidence)
    elif not proportions and len(a) >= 2 and len(b) >= 2:
        result = welch_t_test(a, b, confidence)
    return Comparison(control, treatment, result, alpha)


def _recommend(
    arms: list[ArmStats],
    comparisons: list[Comparison],
    srm: SRMResult,
    min_samples: int,
    metric: str,
    unit: str = "request",
) -> Recommendation:
    control = arms[0]
    label = "mean reward" if metric == "reward" else "thumbs-up rate"
    if srm.flagged:
        return Recommendation(
            "srm",
            None,
            (
                f"Do not decide: the traffic split does not match the weights (sample-ratio mismatch, "
                f"chi²={srm.chi2:.1f}, p={srm.p_value:.2g}). Check assignment, logging and errors per arm first."
            ),
        )
    if all(arm.metric.n == 0 for arm in arms):
        return Recommendation("no-data", None, "No outcomes yet: send feedback to POST /v1/feedback.")
    samples = "outcomes" if unit == "request" else "users with outcomes"
    short = [arm for arm in arms if arm.metric.n < min_samples]
    if short:
        missing = ", ".join(f"{arm.ref} has {arm.metric.n}" for arm in short)
        return Recommendation(
            "insufficient-data",
            None,
            (f"Keep running: no winner before {min_samples} {samples} per arm ({missing})."),
        )
    significant = [c for c in comparisons if c.significant and c.result is not None]
    better = [c for c in significant if c.result is not None and c.result.difference > 0]
    if better:
        best = max(better, key=lambda c: c.result.difference if c.result else 0.0)
        assert best.result is not None
        ref = next(arm.ref for arm in arms if arm.version == best.treatment)
        return Recommendation(
            "winner",
            best.treatment,
            (
                f"{ref} beats {control.ref} on {label} by {best.result.difference:+.4g} "
                f"(CI {best.result.ci_low:+.4g} to {best.result.ci_high:+.4g}, p={best.result.p_value:.2g}); "
                f"promote it with `moea ab stop {control.ref.rsplit('@', 1)[0]} --winner {best.treatment}`."
            ),
        )
    if significant:
        return Recommendation(
            "keep-control",
            control.version,
            (f"Keep {control.ref}: every significantly different arm is worse on {label}."),
        )
    p_values = ", ".join(f"p={c.result.p_value:.2g}" for c in comparisons if c.result is not None)
    return Recommendation(
        "no-difference",
        None,
        (f"No significant difference on {label} ({p_values}); keep {control.ref} or collect more data."),
    )


def compute_report(
    experiment: ExperimentView,
    requests: Sequence[RequestRecord],
    outcomes: Sequence[OutcomeRecord],
    *,
    min_samples: int = 100,
    alpha: float = 0.05,
    confidence: float = 0.95,
    unit: str = "request",
) -> ABReport:
    """The A/B report of ``experiment`` from its logged requests and outcomes (pure, no I/O).

    ``unit="request"`` judges every request with an outcome as one sample (thumbs: two-proportion
    z-test; reward: Welch). ``unit="user"`` first averages each user's outcomes (requests without a
    user count alone) and runs Welch's test on those means for either metric: users are assigned
    once, so their requests are not independent samples, and heavy users would otherwise make
    differences look more certain than they are. ``min_samples`` counts samples of the chosen unit.

    Shadow copies get a row of their own; requests on a version that is not an arm are only counted
    (:attr:`ABReport.other_requests`). The split is
    checked on assignment units (users plus anonymous requests), for the same reason. Treatment arms
    are compared with the control at ``alpha`` divided by the number of treatments (Bonferroni).
    """
    if experiment.metric not in METRICS:
        raise ABError(f"unknown metric {experiment.metric!r}; use one of {', '.join(METRICS)}")
    if unit not in UNITS:
        raise ABError(f"unknown analysis unit {unit!r}; use one of {', '.join(UNITS)}")
    if not experiment.arms:
        raise ABError(f"experiment {experiment.id} has no arms")
    metric, expert = experiment.metric, experiment.expert
    proportions = metric == "thumbs" and unit == "request"
    total_weight = sum(float(arm.weight) for arm in experiment.arms) or 1.0
    arm_versions = [int(arm.version) for arm in experiment.arms]
    by_version: dict[int, list[RequestRecord]] = {version: [] for version in arm_versions}
    shadow_requests: list[RequestRecord] = []
    other_requests = 0
    for request in requests:
        if request.shadow:
            shadow_requests.append(request)
        elif request.version in by_version:
            by_version[int(request.version)].append(request)
        else:
            other_requests += 1
    outcome_by_request = _latest_outcomes(outcomes, metric)
    values = {v: _outcome_values(by_version[v], outcome_by_request, unit) for v in arm_versions}
    arms = [
        _arm_stats(
            f"{expert}@{v}",
            v,
            float(arm.weight) / total_weight,
            by_version[v],
            values[v],
            proportions,
            confidence,
        )
        for v, arm in zip(arm_versions, experiment.arms, strict=True)
    ]
    shadow = None
    if experiment.shadow_version is not None or shadow_requests:
        version = experiment.shadow_version if experiment.shadow_version is not None else -1
        shadow = _arm_stats(
            f"{expert}@{version}", version, 0.0, shadow_requests, [], proportions, confidence, shadow=True
        )
    corrected_alpha = alpha / max(1, len(arms) - 1)
    comparisons = [
        _compare(arm_versions[0], v, values, proportions, corrected_alpha, confidence)
        for v in arm_versions[1:]
    ]
    srm = srm_check([arm.units for arm in arms], [float(arm.weight) for arm in experiment.arms])
    return ABReport(
        experiment_id=int(experiment.id),
        expert=expert,
        metric=metric,
        status=experiment.status,
        salt=experiment_salt(experiment),
        started_at=experiment.started_at,
        stopped_at=experiment.stopped_at,
        winner=experiment.winner,
        arms=arms,
        shadow=shadow,
        comparisons=comparisons,
        srm=srm,
        recommendation=_recommend(arms, comparisons, srm, min_samples, metric, unit),
        min_samples=min_samples,
        alpha=alpha,
        unit=unit,
        other_requests=other_requests,
    )


def build_report(
    registry: ExperimentRegistry,
    expert_or_experiment: str | int,
    *,
    min_samples: int = 100,
    alpha: float = 0.05,
    confidence: float = 0.95,
    unit: str = "request",
) -> ABReport:
    """Load an experiment (expert name → its latest experiment, or an id) and report on it."""
    experiment = registry.get_experiment(expert_or_experiment)
    requests = registry.experiment_requests(experiment.id)
    outcomes = registry.experiment_outcomes(experiment.id)
    return compute_report(
        experiment, requests, outcomes, min_samples=min_samples, alpha=alpha, confidence=confidence, unit=unit
    )


# --------------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------------


def _fmt(value: float, digits: int = 4) -> str:
    return "–" if value is None or not math.isfinite(value) else f"{value:.{digits}g}"


def _fmt_ci(ci: MeanCI) -> str:
    if ci.n == 0:
        return "–"
    if not math.isfinite(ci.low):
        return _fmt(ci.mean)
    return f"{_fmt(ci.mean)} [{_fmt(ci.low)}, {_fmt(ci.high)}]"


def _arm_rows(report: ABReport) -> list[list[str]]:
    rows = []
    total_units = sum(arm.units for arm in report.arms) or 1
    for index, arm in enumerate(report.arms + ([report.shadow] if report.shadow else [])):
        role = "shadow" if arm.shadow else ("control" if index == 0 else "treatment")
        observed = "–" if arm.shadow else f"{arm.units / total_units:.1%}"
        rows.append(
            [
                arm.ref,
                role,
                "–" if arm.shadow else f"{arm.weight:.1%}",
                observed,
                str(arm.requests),
                str(arm.users),
                str(arm.errors),
                _fmt(arm.latency_p50_ms, 4),
                _fmt(arm.latency_p95_ms, 4),
                str(arm.prompt_tokens),
                str(arm.completion_tokens),
                str(arm.metric.n),
                _fmt_ci(arm.metric),
            ]
        )
    return rows


def _comparison_rows(report: ABReport) -> list[list[str]]:
    rows = []
    for comparison in report.comparisons:
        result = comparison.result
        name = f"{report.expert}@{comparison.treatment} vs @{comparison.control}"
        if result is None:
            rows.append([name, "–", "not enough outcomes", "–", "–", "no"])
            continue
        rows.append(
            [
                name,
                f"{result.difference:+.4g} [{result.ci_low:+.4g}, {result.ci_high:+.4g}]",
                f"{result.test}: {_fmt(result.statistic, 4)}"
                + (f" (df {result.df:.1f})" if result.df else ""),
                f"{result.p_value:.3g}",
                f"{comparison.alpha:.3g}",
                "yes" if comparison.significant else "no",
            ]
        )
    return rows


ARM_HEADERS = [
    "Arm",
    "Role",
    "Weight",
    "Observed",
    "Requests",
    "Users",
    "Errors",
    "p50 ms",
    "p95 ms",
    "Tokens in",
    "Tokens out",
    "Outcomes",
    "Mean [95% CI]",
]
COMPARISON_HEADERS = ["Comparison", "Difference [95% CI]", "Test", "p", "alpha", "Significant"]


def _summary_lines(report: ABReport) -> list[str]:
    started = report.started_at.isoformat(timespec="seconds") if report.started_at else "?"
    status = report.status + (
        f", winner {report.expert}@{report.winner}" if report.winner is not None else ""
    )
    srm = report.srm
    srm_line = f"Sample ratio: chi²={_fmt(srm.chi2, 3)}, p={srm.p_value:.3g} → " + (
        f"MISMATCH (p < {srm.alpha:g})" if srm.flagged else "ok"
    )
    if report.other_requests:
        srm_line += f"; {report.other_requests} requests on versions outside the arms were left out"
    return [
        f"Experiment {report.experiment_id} on {report.expert} ({status}; started {started}; "
        f"metric {report.metric} per {report.unit}; salt {report.salt!r})",
        srm_line,
        f"Recommendation: {report.recommendation.text}",
    ]


def _markdown_table(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def render_report(report: ABReport, *, markdown: bool = False, width: int = 160) -> str:
    """The report as text: rich tables (terminal) or, with ``markdown=True``, GitHub-flavoured markdown."""
    title, srm_line, recommendation = _summary_lines(report)
    if markdown:
        parts = [f"## A/B report: {title}", _markdown_table(ARM_HEADERS, _arm_rows(report))]
        if report.comparisons:
            parts.append(_markdown_table(COMPARISON_HEADERS, _comparison_rows(report)))
        parts += [f"**{srm_line}**" if report.srm.flagged else srm_line, f"**{recommendation}**"]
        return "\n\n".join(parts) + "\n"

    from rich.console import Console
    from rich.table import Table

    buffer = io.StringIO()
    console = Console(file=buffer, width=width, color_system=None, force_terminal=False, highlight=False)
    arms_table = Table(title=title, title_justify="left")
    for header in ARM_HEADERS:
        arms_table.add_column(header, justify="left" if header in ("Arm", "Role") else "right", no_wrap=True)
    for row in _arm_rows(report):
        arms_table.add_row(*row)
    console.print(arms_table)
    if report.comparisons:
        tests_table = Table()
        for header in COMPARISON_HEADERS:
            tests_table.add_column(header)
        for row in _comparison_rows(report):
            tests_table.add_row(*row)
        console.print(tests_table)
    console.print(srm_line, soft_wrap=True)
    console.print(recommendation, soft_wrap=True)
    return buffer.getvalue()


def plot_report(report: ABReport, path: str | Path) -> Path:
    """Write a PNG: per-arm mean with its 95% CI (left) and configured vs observed traffic (right)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure = Figure(figsize=(10, 4.2), layout="constrained")
    FigureCanvasAgg(figure)  # no pyplot: no global state, safe off the main thread
    metric_axes, split_axes = figure.subplots(1, 2)
    labels = [
        f"@{arm.version}" + (" (control)" if index == 0 else "") for index, arm in enumerate(report.arms)
    ]
    positions = np.arange(len(report.arms))
    means = np.array([arm.metric.mean for arm in report.arms], dtype=float)
    lows = np.array([arm.metric.low for arm in report.arms], dtype=float)
    highs = np.array([arm.metric.high for arm in report.arms], dtype=float)
    errors = np.nan_to_num(np.vstack([means - lows, highs - means]), nan=0.0)
    colors = ["tab:gray"] + ["tab:blue"] * (len(report.arms) - 1)
    if report.recommendation.winner is not None and report.recommendation.decision == "winner":
        colors = [
            "tab:green" if arm.version == report.recommendation.winner else color
            for arm, color in zip(report.arms, colors, strict=True)
        ]
    metric_axes.errorbar(positions, means, yerr=errors, fmt="none", ecolor="black", capsize=6)
    metric_axes.scatter(positions, means, c=colors, s=60, zorder=3)
    if math.isfinite(means[0]):
        metric_axes.axhline(means[0], color="tab:gray", linestyle="--", linewidth=1)
    metric_axes.set_xticks(
        positions, [f"{label}\nn={arm.metric.n}" for label, arm in zip(labels, report.arms, strict=True)]
    )
    metric_axes.set_xlim(-0.6, len(report.arms) - 0.4)
    metric_axes.set_ylabel("thumbs-up rate" if report.metric == "thumbs" else "mean reward")
    metric_axes.set_title(f"{report.metric} per arm (95% CI)")

    total_units = sum(arm.units for arm in report.arms) or 1
    bar_width = 0.38
    split_axes.bar(
        positions - bar_width / 2,
        [arm.weight for arm in report.arms],
        bar_width,
        label="configured",
        color="tab:gray",
    )
    split_axes.bar(
        positions + bar_width / 2,
        [arm.units / total_units for arm in report.arms],
        bar_width,
        label="observed (units)",
        color="tab:red" if report.srm.flagged else "tab:blue",
    )
    split_axes.set_xticks(positions, labels)
    split_axes.set_ylim(0, 1)
    split_axes.set_ylabel("share of assignment units")
    srm_state = "MISMATCH" if report.srm.flagged else "ok"
    split_axes.set_title(f"traffic split (SRM p={report.srm.p_value:.2g}, {srm_state})")
    split_axes.legend(loc="upper right", fontsize=8)
    figure.suptitle(
        f"A/B experiment {report.experiment_id}: {report.expert} — {report.recommendation.decision}"
    )
    figure.savefig(path, dpi=120)
    return path
