"""The gateway's guardrail monitor against a real SQLite registry: requests written as the gateway writes
them (`registry.log_requests`), the monitor's `check_once` as its periodic task calls it."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest

from registry.errors import ConflictError
from registry.service import Registry
from registry.views import OutcomeRecord, RequestRecord
from serving.ab.assign import assign_arm
from serving.ab.report import build_report
from serving.ab.stats import srm_check
from serving.guard_monitor import ACTOR, GuardMonitor
from serving.metrics import GatewayMetrics

from .registry_fixtures import make_run_dir


@pytest.fixture
def registry(tmp_path: Path) -> Registry:
    """Versions 1..3 of `summarize` in a real SQLite registry, prod on version 1."""
    with Registry(f"sqlite:///{tmp_path / 'registry.db'}", tmp_path / "store") as registry:
        for seed in (1, 2, 3):
            registry.register_run(make_run_dir(tmp_path, ["summarize"], seed))
        registry.promote("summarize@1")
        yield registry


def serve(
    registry: Registry, experiment_id: int, users: range, error_rate: dict[int, float], seed: int,
    when: datetime | None = None, thumbs: dict[int, float] | None = None,
) -> None:  # fmt: skip
    """Log one request per user the way the gateway does: arm from assign_arm, status 500 at the arm's
    error rate (and a thumbs outcome when given)."""
    rng = np.random.default_rng(seed)
    experiment = registry.get_experiment(experiment_id)
    requests, outcomes = [], []
    for index in users:
        version = assign_arm(experiment, f"user-{index}")
        status = 500 if rng.random() < error_rate[version] else 200
        request_id = f"chatcmpl-{experiment_id}-{index}"
        requests.append(RequestRecord(request_id, when or datetime.now(UTC), "summarize", version,
                                      experiment_id, f"user-{index}", False, float(rng.gamma(4, 30)), 12, 30,
                                      status))  # fmt: skip
        if thumbs is not None and status == 200:
            outcomes.append(
                OutcomeRecord(request_id, datetime.now(UTC), thumbs=bool(rng.random() < thumbs[version]))
            )
    registry.log_requests(requests)
    registry.record_outcomes(outcomes)


def breached_value(metrics: GatewayMetrics, experiment_id: int, guardrail: str) -> float | None:
    return metrics.registry.get_sample_value(
        "moea_guardrail_breached",
        {"expert": "summarize", "experiment": str(experiment_id), "guardrail": guardrail},
    )


def test_failing_arm_is_stopped_prod_on_control_reason_in_history_alert_raised(registry: Registry) -> None:
    experiment = registry.start_experiment(
        "summarize", [(1, 50), (2, 50)], guardrails=["error_rate<=0.02", "p95_latency_ms<=1.5x"]
    )
    metrics, other_metrics = GatewayMetrics(), GatewayMetrics()
    monitor, other = GuardMonitor(registry, metrics), GuardMonitor(registry, other_metrics)
    serve(registry, experiment.id, range(20), {1: 0.0, 2: 0.4}, seed=1)
    assert monitor.check_once() == [] and other.check_once() == []  # 20 users: still waiting for data
    assert breached_value(metrics, experiment.id, "error_rate<=0.02") is None

    serve(registry, experiment.id, range(20, 400), {1: 0.0, 2: 0.4}, seed=2)
    (reason,) = monitor.check_once()
    assert reason.startswith(
        f"guardrail error_rate<=0.02 breached by summarize@2 in experiment {experiment.id}"
    )

    stopped = registry.get_experiment(experiment.id)
    assert stopped.status == "stopped" and stopped.stop_reason == reason and stopped.winner is None
    assert registry.active_experiment("summarize") is None  # gateways route NAME to prod again
    assert registry.resolve("summarize@prod").version == 1
    last = registry.history("summarize", "prod")[-1]
    assert (last.action, last.from_version, last.to_version, last.actor) == ("guardrail", 1, 1, ACTOR)
    assert last.reason == reason and "vs limit 0.02" in reason
    assert breached_value(metrics, experiment.id, "error_rate<=0.02") == 1.0

    assert other.check_once() == []  # the second gateway: nothing left to stop, but it raises the alert
    assert breached_value(other_metrics, experiment.id, "error_rate<=0.02") == 1.0
    assert len([e for e in registry.history("summarize", "prod") if e.action == "guardrail"]) == 1

    # The no-move note is not a move: prod has no previous holder to roll back to (it would "roll back"
    # from 1 to 1 if the note counted).
    with pytest.raises(ConflictError, match="no previous holder"):
        registry.rollback("summarize")


def test_breach_moves_prod_back_to_control(registry: Registry) -> None:
    """Prod had moved off the control (to version 3) during the experiment: the stop moves it back."""
    experiment = registry.start_experiment("summarize", [(1, 50), (2, 50)], guardrails=["error_rate<=+0.05"])
    registry.promote("summarize@3")
    serve(registry, experiment.id, range(300), {1: 0.01, 2: 0.5}, seed=3)
    (reason,) = GuardMonitor(registry, GatewayMetrics()).check_once()
    assert registry.resolve("summarize@prod").version == 1
    last = registry.history("summarize", "prod")[-1]
    assert (last.action, last.from_version, last.to_version, last.reason) == ("guardrail", 3, 1, reason)


def test_null_arm_does_not_trip_over_many_checks(registry: Registry) -> None:
    """Same 2 % error rate and latency on both arms: 25 checks while 2,500 users arrive, nothing trips."""
    experiment = registry.start_experiment(
        "summarize",
        [(1, 50), (2, 50)],
        guardrails=["error_rate<=+0.01", "p95_latency_ms<=1.2x", "thumbs>=-0.05"],
    )
    metrics = GatewayMetrics()
    monitor = GuardMonitor(registry, metrics)
    for look in range(25):
        users = range(look * 100, (look + 1) * 100)
        serve(registry, experiment.id, users, {1: 0.02, 2: 0.02}, seed=look, thumbs={1: 0.7, 2: 0.7})
        assert monitor.check_once() == []
    assert registry.get_experiment(experiment.id).status == "running"
    assert metrics.registry.get_sample_value("moea_guardrail_checks_total", {"outcome": "breached"}) is None
    assert metrics.registry.get_sample_value("moea_guardrail_checks_total", {"outcome": "ok"}) >= 60


def test_ramp_advances_while_guardrails_hold_and_stays_sticky(registry: Registry) -> None:
    experiment = registry.start_experiment(
        "summarize",
        [(1, 1), (2, 1)],
        guardrails=["error_rate<=0.05"],
        ramp=[1, 5, 25, 50],
        guard_settings={"step_s": 60, "step_units": 20},
    )
    assert [(a.version, a.weight) for a in experiment.arms] == [(1, 99.0), (2, 1.0)]
    now = [experiment.step_started_at]
    metrics = GatewayMetrics()
    monitor = GuardMonitor(registry, metrics, clock=lambda: now[0])
    users = [f"user-{i}" for i in range(5000)]
    treated = {u for u in users if assign_arm(experiment, u) == 2}
    shares = [1.0]
    first = 0
    for _ in range(12):
        current = registry.get_experiment(experiment.id)
        now[0] = current.step_started_at + timedelta(seconds=61)
        # enough treatment users in this step (timestamped inside it: steps are ms apart here), healthy arms
        serve(registry, experiment.id, range(first, first + 400), {1: 0.0, 2: 0.0}, seed=first,
              when=current.step_started_at + timedelta(microseconds=1))  # fmt: skip
        first += 400
        actions = monitor.check_once()
        after = registry.get_experiment(experiment.id)
        if after.ramp_step != current.ramp_step:
            assert "ramp step" in actions[0]
            shares.append(after.arms[1].weight)
            now_treated = {u for u in users if assign_arm(after, u) == 2}
            assert treated <= now_treated  # users already in the treatment stay there
            treated = now_treated
    assert shares == [1.0, 5.0, 25.0, 50.0]
    assert abs(len(treated) / len(users) - 0.5) < 0.03
    share = {"expert": "summarize", "experiment": str(experiment.id)}
    assert metrics.registry.get_sample_value("moea_experiment_treatment_share", share) == 50.0
    assert registry.advance_ramp(experiment.id, 3) is None  # the last step: nothing further
    assert len(registry.get_experiment(experiment.id).ramp_started) == 4

    # The report checks the split against the ramp's history, not today's 50/50 weights.
    report = build_report(registry, experiment.id)
    assert not report.srm.flagged, report.srm
    assert srm_check([arm.units for arm in report.arms], [50, 50]).flagged


def test_ramp_waits_for_duration_and_a_second_gateway_does_not_double_advance(registry: Registry) -> None:
    experiment = registry.start_experiment(
        "summarize", [(1, 1), (2, 1)], ramp=[10, 20, 30], guard_settings={"step_s": 3600, "step_units": 5}
    )
    serve(registry, experiment.id, range(300), {1: 0, 2: 0}, seed=0, when=experiment.step_started_at)
    early = GuardMonitor(registry, GatewayMetrics(), clock=lambda: experiment.step_started_at)
    assert early.check_once() == []
    later = experiment.step_started_at + timedelta(hours=1, seconds=1)
    one, two = (GuardMonitor(registry, GatewayMetrics(), clock=lambda: later) for _ in range(2))
    assert len(one.check_once()) == 1
    assert two.check_once() == []  # the new step has just begun (and has no requests yet)
    assert registry.get_experiment(experiment.id).ramp_step == 1
    assert registry.advance_ramp(experiment.id, 0) is None  # compare-and-set: a stale step is refused
