"""The A/B report: what each arm saw, the comparisons with the control, and a recommendation.

This runs off the request path, on what the gateway logged through :mod:`serving.request_log`:
:func:`build_report` joins requests with their outcomes per arm, compares every treatment arm with the
control arm (the first arm configured, normally the current prod version) with the test that fits the
metric (:mod:`serving.ab.stats`, :mod:`serving.ab.sequential`), checks the traffic split for sample-ratio mismatch and only then
recommends a winner. The report is plain data; :mod:`serving.ab.render` turns it into tables and a plot.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from registry.experiment_metrics import EXPERIMENT_METRICS

from .assign import ABError, experiment_salt
from .compare import Comparison, compare_arms
from .samples import analysis_notes, latest_outcomes, unit_samples, unit_values
from .sequential import DEFAULT_MIXING_SD
from .stats import (
    MeanCI,
    SRMResult,
    mean_confidence_interval,
    proportion_confidence_interval,
    srm_check,
)

if TYPE_CHECKING:  # the registry's views; any object with the same fields works
    from registry.views import ExperimentView, OutcomeRecord, RequestRecord

__all__ = [
    "UNITS",
    "VERDICTS",
    "ABReport",
    "ArmStats",
    "Comparison",
    "ExperimentRegistry",
    "Recommendation",
    "build_report",
    "compute_report",
]

UNITS = ("auto", "user", "request")
"""Analysis units of :func:`compute_report` (``auto``: ``user`` when any request has a user id)."""
VERDICTS = ("sequential", "fixed")
"""What decides "significant": the always-valid mSPRT (default) or the fixed-horizon test (one look only)."""


class ExperimentRegistry(Protocol):
    """The registry methods :func:`build_report` calls."""

    def get_experiment(self, expert_or_id: str | int) -> Any: ...

    def experiment_requests(self, experiment_id: int) -> list[Any]: ...

    def experiment_outcomes(self, experiment_id: int) -> list[Any]: ...


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
    unit: str = "user"
    """Analysis unit used: ``user`` or ``request`` (see :func:`compute_report`)."""
    verdict: str = "sequential"
    """``sequential`` (always-valid mSPRT) or ``fixed`` (fixed-horizon test, valid for one look only)."""
    mixing_sd: float = DEFAULT_MIXING_SD
    """mSPRT mixing standard deviation, in pooled per-unit standard deviations."""
    notes: list[str] = field(default_factory=list)
    """Caveats of this analysis (e.g. that per-request p-values are anti-conservative)."""
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
        low, high = best.interval
        kind = "confidence sequence" if best.verdict == "sequential" else "CI"
        which = "always-valid p" if best.verdict == "sequential" else "p"
        return Recommendation(
            "winner",
            best.treatment,
            (
                f"{ref} beats {control.ref} on {label} by {best.result.difference:+.4g} "
                f"({kind} {low:+.4g} to {high:+.4g}, {which}={best.p_value:.2g}); "
                f"promote it with `moea ab stop {control.ref.rsplit('@', 1)[0]} --winner {best.treatment}`."
            ),
        )
    if significant:
        return Recommendation(
            "keep-control",
            control.version,
            (f"Keep {control.ref}: every significantly different arm is worse on {label}."),
        )
    return _no_difference(comparisons, control.ref, label)


def _no_difference(comparisons: list[Comparison], control_ref: str, label: str) -> Recommendation:
    """The verdict when no arm differs significantly, with the differences the sample could have shown."""
    which = "always-valid p" if comparisons and comparisons[0].verdict == "sequential" else "p"
    p_values = ", ".join(f"{which}={c.p_value:.2g}" for c in comparisons if c.result is not None)
    mdes = ", ".join(
        f"±{c.mde_sequential if c.verdict == 'sequential' else c.mde:.3g}"
        for c in comparisons
        if math.isfinite(c.mde)
    )
    detectable = f"; so far only differences beyond about {mdes} would show" if mdes else ""
    return Recommendation(
        "no-difference",
        None,
        (
            f"No significant difference on {label} ({p_values}{detectable}); "
            f"keep {control_ref} or collect more data."
        ),
    )


def _check_report_settings(experiment: ExperimentView, unit: str, verdict: str) -> None:
    """Raise :class:`ABError` unless the metric, analysis unit and verdict are known and there are arms."""
    if experiment.metric not in EXPERIMENT_METRICS:
        raise ABError(f"unknown metric {experiment.metric!r}; use one of {', '.join(EXPERIMENT_METRICS)}")
    if unit not in UNITS:
        raise ABError(f"unknown analysis unit {unit!r}; use one of {', '.join(UNITS)}")
    if verdict not in VERDICTS:
        raise ABError(f"unknown verdict {verdict!r}; use one of {', '.join(VERDICTS)}")
    if not experiment.arms:
        raise ABError(f"experiment {experiment.id} has no arms")


def _split_requests(
    requests: Sequence[RequestRecord], arm_versions: list[int]
) -> tuple[dict[int, list[RequestRecord]], list[RequestRecord], int]:
    """Each arm's requests, the shadow copies, and the number of requests on a version that is no arm."""
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
    return by_version, shadow_requests, other_requests


def _expected_split(
    experiment: ExperimentView, by_version: dict[int, list[RequestRecord]], arm_versions: list[int]
) -> list[float]:
    """What the split is checked against: the weights, or under a ramp the expected units per arm.

    A ramp grows the treatment share over time and users stay where they are (a control user may move
    to the treatment, never back), so a unit is expected in the control with probability ``1 - share``
    at its first request and in the treatment with ``share`` at its last one (a user moved by the ramp
    counts in both, as in the arm statistics).
    """
    ramp, started = list(getattr(experiment, "ramp", None) or []), getattr(experiment, "ramp_started", None)
    if not ramp or not started or len(arm_versions) != 2:
        return [float(arm.weight) for arm in experiment.arms]

    def share(when: datetime) -> float:
        step = max([0, *(i for i, begun in enumerate(started) if begun <= when)])
        return ramp[min(step, len(ramp) - 1)] / 100

    seen: dict[str, list[datetime]] = {}
    for request in (r for v in arm_versions for r in by_version[v]):
        key = f"user:{request.user}" if request.user else f"request:{request.request_id}"
        first_last = seen.setdefault(key, [request.created_at, request.created_at])
        first_last[0], first_last[1] = (
            min(first_last[0], request.created_at),
            max(first_last[1], request.created_at),
        )
    control = sum(1 - share(first) for first, _ in seen.values())
    treatment = sum(share(last) for _, last in seen.values())
    if control + treatment <= 0:
        return [float(arm.weight) for arm in experiment.arms]
    return [control, treatment]


def _configured_arm_stats(
    experiment: ExperimentView,
    by_version: dict[int, list[RequestRecord]],
    values: dict[int, list[float]],
    proportions: bool,
    confidence: float,
) -> list[ArmStats]:
    """One row per configured arm, in arm order, with its weight as a share of the total weight."""
    total_weight = sum(float(arm.weight) for arm in experiment.arms) or 1.0
    rows = []
    for arm in experiment.arms:
        version = int(arm.version)
        share = float(arm.weight) / total_weight
        ref = f"{experiment.expert}@{version}"
        rows.append(
            _arm_stats(ref, version, share, by_version[version], values[version], proportions, confidence)
        )
    return rows


def _shadow_stats(
    experiment: ExperimentView, shadow_requests: list[RequestRecord], proportions: bool, confidence: float
) -> ArmStats | None:
    """The shadow version's row: None unless the experiment has a shadow or shadow copies were logged."""
    if experiment.shadow_version is None and not shadow_requests:
        return None
    version = experiment.shadow_version if experiment.shadow_version is not None else -1
    return _arm_stats(
        f"{experiment.expert}@{version}",
        version,
        0.0,
        shadow_requests,
        [],
        proportions,
        confidence,
        shadow=True,
    )


# Over 60 lines only because of its docstring (the statistics, ~25 lines); the code is ~45 lines.
def compute_report(
    experiment: ExperimentView,
    requests: Sequence[RequestRecord],
    outcomes: Sequence[OutcomeRecord],
    *,
    min_samples: int = 100,
    alpha: float = 0.05,
    confidence: float = 0.95,
    unit: str = "auto",
    verdict: str = "sequential",
    mixing_sd: float = DEFAULT_MIXING_SD,
) -> ABReport:
    """The A/B report of ``experiment`` from its logged requests and outcomes (pure, no I/O).

    ``unit="user"`` (what ``auto`` picks as soon as any request carries a user id) first averages
    each user's outcomes and compares those means with Welch's test, for either metric: a user is
    assigned once and stays on the arm, so the requests of one user are not independent samples, and
    heavy users would make differences look far more certain than they are. A request without a user
    id was assigned by a draw of its own and counts as one unit. ``unit="request"`` judges every
    request as one sample (thumbs: two-proportion z-test; reward: Welch) and is anti-conservative
    whenever users send several requests (the report says so in :attr:`ABReport.notes`).
    ``min_samples`` counts samples of the chosen unit.

    ``verdict="sequential"`` (default) calls a difference significant by the always-valid mSPRT
    (:mod:`serving.ab.sequential`) replayed over the outcomes as they arrived, so looking at the report
    every hour and stopping at the first "significant" keeps the error rate at ``alpha``;
    ``verdict="fixed"`` uses the fixed-horizon test, valid only for a single look at a planned size.
    Both are always computed, with the minimum detectable effects of each at the current sample.

    Shadow copies get a row of their own; requests on a version that is not an arm are only counted
    (:attr:`ABReport.other_requests`). The split is checked on assignment units (users plus anonymous
    requests). Treatment arms are compared with the control at ``alpha`` divided by the number of
    treatments (Bonferroni).
    """
    _check_report_settings(experiment, unit, verdict)
    metric, expert = experiment.metric, experiment.expert
    arm_versions = [int(arm.version) for arm in experiment.arms]
    by_version, shadow_requests, other_requests = _split_requests(requests, arm_versions)
    if unit == "auto":
        unit = "user" if any(r.user for v in arm_versions for r in by_version[v]) else "request"
    proportions = metric == "thumbs" and unit == "request"
    outcome_by_request = latest_outcomes(outcomes, metric)
    samples = {v: unit_samples(by_version[v], outcome_by_request, unit) for v in arm_versions}
    values = {v: unit_values(samples[v]) for v in arm_versions}
    arms = _configured_arm_stats(experiment, by_version, values, proportions, confidence)
    shadow = _shadow_stats(experiment, shadow_requests, proportions, confidence)
    corrected_alpha = alpha / max(1, len(arms) - 1)
    comparisons = [
        compare_arms(
            arm_versions[0], v, samples, proportions, corrected_alpha, confidence, verdict, mixing_sd
        )
        for v in arm_versions[1:]
    ]
    srm = srm_check([arm.units for arm in arms], _expected_split(experiment, by_version, arm_versions))
    arm_requests = [r for v in arm_versions for r in by_version[v]]
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
        verdict=verdict,
        mixing_sd=mixing_sd,
        notes=analysis_notes(arm_requests, outcome_by_request, unit, verdict),
        other_requests=other_requests,
    )


def build_report(
    registry: ExperimentRegistry,
    expert_or_experiment: str | int,
    *,
    min_samples: int = 100,
    alpha: float = 0.05,
    confidence: float = 0.95,
    unit: str = "auto",
    verdict: str = "sequential",
    mixing_sd: float = DEFAULT_MIXING_SD,
) -> ABReport:
    """Load an experiment (expert name → its latest experiment, or an id) and report on it."""
    experiment = registry.get_experiment(expert_or_experiment)
    requests = registry.experiment_requests(experiment.id)
    outcomes = registry.experiment_outcomes(experiment.id)
    return compute_report(
        experiment,
        requests,
        outcomes,
        min_samples=min_samples,
        alpha=alpha,
        confidence=confidence,
        unit=unit,
        verdict=verdict,
        mixing_sd=mixing_sd,
    )
