"""Guardrail grammar, the always-valid breach decision and the ramp's stickiness (pure, fast, seeded)."""

from __future__ import annotations

import math
from dataclasses import replace
from datetime import timedelta

import numpy as np
import pytest

from registry.experiments import ramp_arms
from registry.views import Arm, OutcomeRecord, RequestRecord
from serving.ab.assign import NUM_BUCKETS, ABError, assign_arm, user_bucket
from serving.ab.guardrails import (
    Guardrail,
    breach_reason,
    breached_guardrail,
    check_guardrails,
    parse_guardrail,
    parse_ramp,
    quantile_confidence_sequence,
    ramp_due,
)

from .ab_fixtures import T0, experiment

# ------------------------------------------------------------------------------------------- grammar


@pytest.mark.parametrize(
    ("spec", "expected", "text"),
    [
        ("error_rate<=0.02", Guardrail("error_rate", "<=", "absolute", 0.02), "error_rate<=0.02"),
        ("p95_latency_ms<=1.2x", Guardrail("p95_latency_ms", "<=", "factor", 1.2), "p95_latency_ms<=1.2x"),
        ("thumbs>=-0.05", Guardrail("thumbs", ">=", "difference", -0.05), "thumbs>=-0.05"),
        (" Error_Rate <= +0.01 ", Guardrail("error_rate", "<=", "difference", 0.01), "error_rate<=+0.01"),
        ("p99_latency_ms<=800", Guardrail("p99_latency_ms", "<=", "absolute", 800.0), "p99_latency_ms<=800"),
        ("reward>=0.9x", Guardrail("reward", ">=", "factor", 0.9), "reward>=0.9x"),
        (
            "mean_latency_ms<=+50",
            Guardrail("mean_latency_ms", "<=", "difference", 50.0),
            "mean_latency_ms<=+50",
        ),
        ("thumbs>=.6", Guardrail("thumbs", ">=", "absolute", 0.6), "thumbs>=0.6"),
    ],
)
def test_grammar_parses_and_prints_canonically(spec: str, expected: Guardrail, text: str) -> None:
    rail = parse_guardrail(spec)
    assert rail == expected
    assert rail.text == text
    assert parse_guardrail(rail.text) == rail  # the stored text parses back to the same guardrail


@pytest.mark.parametrize(
    ("spec", "says"),
    [
        ("error_rate<0.02", "is not METRIC<=BOUND"),
        ("error_rate<=", "is not METRIC<=BOUND"),
        ("error_rate<=abc", "is not METRIC<=BOUND"),
        ("latency<=100", "unknown metric 'latency'"),
        ("p100_latency_ms<=100", "unknown metric"),
        ("p95_latency_ms>=-10", "not a difference"),
        ("p95_latency_ms<=-1.2x", "unsigned number above 0"),
        ("error_rate<=0x", "unsigned number above 0"),
        ("error_rate<=2", "an absolute bound lies in [0, 1]"),
        ("p95_latency_ms<=1e999", "must be finite"),
    ],
)
def test_grammar_rejects_with_one_line_errors(spec: str, says: str) -> None:
    with pytest.raises(ABError) as caught:
        parse_guardrail(spec)
    assert says in str(caught.value)
    assert "\n" not in str(caught.value)


def test_ramp_grammar() -> None:
    assert parse_ramp("1,5,25,50") == [1.0, 5.0, 25.0, 50.0]
    assert parse_ramp("0.5, 100") == [0.5, 100.0]
    for bad in ("", "5,1", "0,5", "1,101", "1,,5", "1,1", "a"):
        with pytest.raises(ABError, match="increasing treatment percentages"):
            parse_ramp(bad)


# ------------------------------------------------------------------------------------------ decision


def _log(
    exp, n_users: int, error_rate: dict[int, float], latency: dict[int, float], seed: int,
    thumbs: dict[int, float] | None = None, start: int = 0,
) -> tuple[list[RequestRecord], list[OutcomeRecord]]:  # fmt: skip
    """Requests (two per user) as the gateway logs them; status 500 with the arm's error rate."""
    rng = np.random.default_rng(seed)
    requests, outcomes = [], []
    for index in range(start, start + n_users):
        user = f"u{index}"
        version = assign_arm(exp, user)
        for k in range(2):
            request_id = f"r{index}-{k}"
            failed = rng.random() < error_rate[version]
            when = T0 + timedelta(seconds=index)
            requests.append(RequestRecord(request_id, when, exp.expert, version, exp.id, user, False,
                                          float(rng.exponential(latency[version])), 10, 20,
                                          500 if failed else 200))  # fmt: skip
            if thumbs is not None and not failed:
                outcomes.append(OutcomeRecord(request_id, when, thumbs=bool(rng.random() < thumbs[version])))
    return requests, outcomes


def _exp(*rails: str, weights: tuple[float, float] = (50, 50)):
    return replace(experiment([(1, weights[0]), (2, weights[1])]), guardrails=list(rails))


def test_failing_arm_breaches_error_rate_and_latency_guardrails() -> None:
    exp = _exp("error_rate<=0.02", "p95_latency_ms<=1.2x", "error_rate<=+0.01")
    requests, _ = _log(exp, 400, {1: 0.0, 2: 0.3}, {1: 100.0, 2: 300.0}, seed=1)
    checks = {check.guardrail.text: check for check in check_guardrails(exp, requests)}
    assert all(check.breached for check in checks.values()), checks
    error = checks["error_rate<=0.02"]
    assert error.version == 2 and 0.25 < error.treatment < 0.35 and error.excess_low > 0
    latency = checks["p95_latency_ms<=1.2x"]
    assert latency.treatment > 2 * latency.limit / 1.2  # p95 of the treatment about 3x the control's
    reason = breach_reason(exp, error)
    assert reason.startswith("guardrail error_rate<=0.02 breached by summarize@2 in experiment 7:")
    assert "back to control summarize@1" in reason and "\n" not in reason
    assert breached_guardrail(reason) == "error_rate<=0.02"
    assert breached_guardrail("manual stop") is None


def test_thumbs_difference_breach_and_hold() -> None:
    exp = _exp("thumbs>=-0.05")
    bad, bad_outcomes = _log(exp, 600, {1: 0, 2: 0}, {1: 100, 2: 100}, seed=2, thumbs={1: 0.8, 2: 0.5})
    assert check_guardrails(exp, bad, bad_outcomes)[0].breached
    good, good_outcomes = _log(exp, 600, {1: 0, 2: 0}, {1: 100, 2: 100}, seed=2, thumbs={1: 0.8, 2: 0.8})
    assert check_guardrails(exp, good, good_outcomes)[0].status == "ok"


def test_waiting_until_each_arm_has_min_units() -> None:
    exp = _exp("error_rate<=0.02", "p95_latency_ms<=1.2x")
    requests, _ = _log(exp, 20, {1: 0.0, 2: 1.0}, {1: 100.0, 2: 100.0}, seed=3)
    assert {check.status for check in check_guardrails(exp, requests)} == {"waiting"}
    assert check_guardrails(replace(exp, guardrails=[]), requests) == []


def test_a_small_excess_over_few_units_is_not_significant() -> None:
    """3 errors in 40 treatment users against a 2 % limit: above it, but not sequentially significant."""
    exp = _exp("error_rate<=0.02")
    requests = [
        RequestRecord(f"r{i}", T0, "summarize", 2, 7, f"u{i}", False, 100.0, 1, 1, 500 if i < 3 else 200)
        for i in range(40)
    ] + [RequestRecord(f"c{i}", T0, "summarize", 1, 7, f"c{i}", False, 100.0, 1, 1, 200) for i in range(40)]
    check = check_guardrails(exp, requests)[0]
    assert check.treatment == pytest.approx(3 / 40) and check.status == "ok"


def test_null_arm_does_not_trip_over_many_checks() -> None:
    """Both arms identical (1 % errors, same latency, same thumbs): 30 checks as 2,000 users arrive, for
    three seeds, with every kind of guardrail, never trips (alpha 0.01)."""
    rails = ("error_rate<=+0.01", "error_rate<=1.5x", "p95_latency_ms<=1.1x", "p50_latency_ms<=1.05x",
             "thumbs>=-0.03", "mean_latency_ms<=1.1x")  # fmt: skip
    exp = _exp(*rails)
    tripped = []
    for seed in range(3):
        requests, outcomes = _log(exp, 2000, {1: 0.01, 2: 0.01}, {1: 100.0, 2: 100.0}, seed=seed,
                                  thumbs={1: 0.7, 2: 0.7})  # fmt: skip
        for look in range(1, 31):
            n = look * 133
            checks = check_guardrails(exp, requests[:n], outcomes[: n * 99 // 100])
            tripped += [(seed, n, c.guardrail.text) for c in checks if c.breached]
    assert tripped == []


def test_quantile_confidence_sequence_covers_and_narrows() -> None:
    rng = np.random.default_rng(4)
    values = rng.exponential(100.0, 20_000)
    truth = -100.0 * math.log(0.05)  # p95 of Exp(mean 100)
    widths, misses = [], 0
    for n in (50, 200, 1000, 5000, 20_000):
        low, high = quantile_confidence_sequence(values[:n], 0.95, alpha=0.05)
        misses += not low <= truth <= high
        widths.append(high - low)
    assert misses == 0
    assert widths[-1] < widths[2] < widths[1]
    assert quantile_confidence_sequence([], 0.95, 0.05) == (-math.inf, math.inf)
    assert quantile_confidence_sequence([1.0, 2.0], 0.95, 0.05)[1] == math.inf


# ------------------------------------------------------------------------------------------------ ramp


def test_ramp_is_sticky_a_growing_share_only_adds_users() -> None:
    """Treatment = the top buckets; each step's treatment users are a superset of the previous step's, and
    its share is the ramp's (to 0.01 %)."""
    base = experiment([(1, 99), (2, 1)])
    users = [f"user-{i}" for i in range(20_000)]
    previous: set[str] = set()
    for share in (1, 5, 25, 50, 100):
        exp = replace(base, arms=ramp_arms([Arm(1, 0), Arm(2, 0)], share))
        treated = {user for user in users if assign_arm(exp, user) == 2}
        assert previous <= treated
        assert abs(len(treated) / len(users) - share / 100) < 0.01
        cut = NUM_BUCKETS - round(share / 100 * NUM_BUCKETS)
        assert all((user_bucket(exp.salt, u) >= cut) == (u in treated) for u in users[:2000])
        previous = treated


def test_ramp_due_needs_duration_and_treatment_units() -> None:
    exp = replace(
        experiment([(1, 99), (2, 1)]),
        ramp=[1.0, 5.0, 25.0],
        ramp_step=1,  # the second step began at T0
        ramp_started=[T0 - timedelta(hours=1), T0],
        guard_settings={"step_s": 600, "step_units": 3},
    )
    before = [RequestRecord("old", T0 - timedelta(seconds=1), "summarize", 2, 7, "a", False, 1, 1, 1, 200)]
    during = [RequestRecord(f"r{u}", T0 + timedelta(seconds=5), "summarize", 2, 7, u, False, 1, 1, 1, 200)
              for u in ("a", "b", "b", "c")]  # fmt: skip
    control = [RequestRecord("c", T0 + timedelta(seconds=5), "summarize", 1, 7, "d", False, 1, 1, 1, 200)]
    later = T0 + timedelta(seconds=601)
    assert not ramp_due(exp, during, T0 + timedelta(seconds=599))  # too early
    assert not ramp_due(exp, before + during[:3] + control, later)  # only users a, b in the step
    assert ramp_due(exp, before + during + control, later)
    assert not ramp_due(replace(exp, ramp_step=2), during, later)  # last step: nothing to advance to
