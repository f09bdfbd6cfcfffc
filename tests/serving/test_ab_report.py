"""The A/B report: per-arm numbers, comparisons, sample-ratio check and the recommendation."""

from __future__ import annotations

from datetime import timedelta

import numpy as np
import pytest

from registry.views import OutcomeRecord, RequestRecord
from serving.ab.assign import ABError, assign_arm
from serving.ab.render import render_report
from serving.ab.report import compute_report

from .ab_fixtures import T0, experiment, synthetic_log


def test_report_per_arm_numbers() -> None:
    exp = experiment([(3, 50), (4, 50)])
    requests, outcomes = synthetic_log(exp, 400, {3: 0.5, 4: 0.5})
    # An anonymous request, an error and a corrected reward (the latest one counts).
    requests.append(RequestRecord("anon-1", T0, exp.expert, 3, exp.id, None, True, 500.0, 5, 5, 500))
    outcomes.append(OutcomeRecord("anon-1", T0, reward=0.0))
    outcomes.append(OutcomeRecord("anon-1", T0 + timedelta(minutes=1), reward=1.0))
    report = compute_report(exp, requests, outcomes, min_samples=10, unit="request")
    control = report.arms[0]
    mine = [r for r in requests if r.version == 3]
    assert control.ref == "summarize@3" and control.weight == 0.5
    assert control.requests == len(mine)
    assert control.users == len({r.user for r in mine if r.user})
    assert control.units == control.users + 1
    assert control.errors == 1
    assert control.prompt_tokens == sum(r.prompt_tokens for r in mine)
    assert control.completion_tokens == sum(r.completion_tokens for r in mine)
    assert control.latency_p50_ms == pytest.approx(np.percentile([r.latency_ms for r in mine], 50))
    assert control.latency_p95_ms == pytest.approx(np.percentile([r.latency_ms for r in mine], 95))
    latest = {o.request_id: o.reward for o in sorted(outcomes, key=lambda o: o.created_at)}
    rewards = [latest[r.request_id] for r in mine if r.request_id in latest]
    assert control.metric.n == len(rewards) and control.metric.mean == pytest.approx(np.mean(rewards))
    assert report.comparisons[0].result is not None and report.comparisons[0].result.test == "welch t"
    assert report.to_dict()["arms"][0]["ref"] == "summarize@3"


def test_recommendation_refuses_before_minimum_sample() -> None:
    exp = experiment([(3, 50), (4, 50)])
    requests, outcomes = synthetic_log(exp, 30, {3: 0.3, 4: 0.9}, requests_per_user=1)
    report = compute_report(exp, requests, outcomes, min_samples=100)
    assert report.comparisons[0].fixed_significant  # the effect is obvious to a one-look test…
    assert report.recommendation.decision == "insufficient-data"  # …but the sample is too small
    assert report.recommendation.winner is None
    assert "100 users with outcomes per arm" in report.recommendation.text


def test_recommendation_calls_a_winner_with_enough_data() -> None:
    exp = experiment([(3, 50), (4, 50)])
    requests, outcomes = synthetic_log(exp, 600, {3: 0.50, 4: 0.58})
    report = compute_report(exp, requests, outcomes, min_samples=100)
    assert report.recommendation.decision == "winner" and report.recommendation.winner == 4
    assert "--winner 4" in report.recommendation.text
    worse = compute_report(exp, *synthetic_log(exp, 600, {3: 0.58, 4: 0.50}), min_samples=100)
    assert worse.recommendation.decision == "keep-control" and worse.recommendation.winner == 3
    same = compute_report(exp, *synthetic_log(exp, 600, {3: 0.5, 4: 0.5}, seed=3), min_samples=100)
    assert same.recommendation.decision == "no-difference" and same.recommendation.winner is None


def test_thumbs_metric_uses_two_proportion_z_test() -> None:
    exp = experiment([(3, 50), (4, 50)], metric="thumbs")
    requests, outcomes = synthetic_log(exp, 800, {3: 0.45, 4: 0.60})
    report = compute_report(exp, requests, outcomes, min_samples=50, unit="request")
    result = report.comparisons[0].result
    assert result is not None and result.test == "two-proportion z"
    control_rate = report.arms[0].metric.mean
    assert 0.3 < control_rate < 0.5 and report.arms[1].metric.mean > control_rate
    assert report.recommendation.winner == 4


def test_srm_blocks_the_recommendation() -> None:
    exp = experiment([(3, 50), (4, 50)])
    requests, outcomes = synthetic_log(exp, 4000, {3: 0.5, 4: 0.6}, skew_drop=(4, 0.15), requests_per_user=1)
    report = compute_report(exp, requests, outcomes, min_samples=100)
    assert report.srm.flagged
    assert report.recommendation.decision == "srm" and report.recommendation.winner is None


def test_three_arms_use_bonferroni_and_shadow_is_reported_apart() -> None:
    exp = experiment([(3, 50), (4, 25), (5, 25)], shadow=6)
    requests, outcomes = synthetic_log(exp, 300, {3: 0.5, 4: 0.5, 5: 0.5})
    requests.append(
        RequestRecord("shadow-1", T0, exp.expert, 6, exp.id, "user-1", False, 80.0, 20, 40, 200, shadow=True)
    )
    stale = RequestRecord("stale-1", T0, exp.expert, 2, exp.id, "user-2", False, 80.0, 20, 40, 200)
    report = compute_report(exp, [*requests, stale], outcomes, min_samples=10)
    assert [c.alpha for c in report.comparisons] == [0.025, 0.025]
    assert report.shadow is not None and report.shadow.requests == 1 and report.shadow.ref == "summarize@6"
    assert sum(arm.requests for arm in report.arms) == len(requests) - 1
    assert report.other_requests == 1 and "1 requests on versions outside the arms" in render_report(report)


def test_report_without_outcomes() -> None:
    exp = experiment([(3, 90), (4, 10)])
    report = compute_report(exp, [], [])
    assert report.recommendation.decision == "no-data"
    assert report.comparisons[0].result is None
    assert "summarize@4" in render_report(report)


def test_unknown_metric_is_rejected() -> None:
    with pytest.raises(ABError, match="unknown metric"):
        compute_report(experiment([(3, 1), (4, 1)], metric="clicks"), [], [])


def test_per_user_analysis_is_not_fooled_by_one_heavy_user() -> None:
    """One enthusiastic user sends 300 high-reward requests on the treatment: per request that looks
    like a clear win, per user it is one sample among 200 and the arms do not differ."""
    exp = experiment([(3, 50), (4, 50)])
    requests, outcomes = synthetic_log(exp, 400, {3: 0.5, 4: 0.5}, requests_per_user=1, seed=11)
    heavy = next(f"user-{i}" for i in range(400) if assign_arm(exp, f"user-{i}") == 4)
    for turn in range(300):
        request_id = f"heavy-{turn}"
        requests.append(
            RequestRecord(request_id, T0, exp.expert, 4, exp.id, heavy, False, 100.0, 20, 30, 200)
        )
        outcomes.append(OutcomeRecord(request_id, T0, reward=0.9))
    per_request = compute_report(exp, requests, outcomes, min_samples=50, unit="request")
    per_user = compute_report(exp, requests, outcomes, min_samples=50)  # the default unit: user
    assert per_request.recommendation.decision == "winner"
    assert per_user.recommendation.decision == "no-difference"
    assert per_user.arms[1].metric.n == per_user.arms[1].users  # one sample per user
    assert per_user.comparisons[0].result is not None and per_user.comparisons[0].result.test == "welch t"
    assert "per user" in render_report(per_user)


def test_per_user_thumbs_uses_welch_on_user_rates() -> None:
    exp = experiment([(3, 50), (4, 50)], metric="thumbs")
    requests, outcomes = synthetic_log(exp, 400, {3: 0.45, 4: 0.60}, requests_per_user=3)
    report = compute_report(exp, requests, outcomes, min_samples=100, unit="user")
    assert report.comparisons[0].result is not None and report.comparisons[0].result.test == "welch t"
    assert report.recommendation.winner == 4
    with pytest.raises(ABError, match="analysis unit"):
        compute_report(exp, requests, outcomes, unit="session")


def test_report_carries_unit_sequential_verdict_and_mde() -> None:
    exp = experiment([(3, 50), (4, 50)])
    requests, outcomes = synthetic_log(exp, 600, {3: 0.50, 4: 0.56}, requests_per_user=3)
    # Outcomes arrive over 60 hours, one user after the other: the sequential test replays them.
    outcomes = [
        OutcomeRecord(o.request_id, T0 + timedelta(minutes=6 * index), reward=o.reward)
        for index, o in enumerate(outcomes)
    ]
    report = compute_report(exp, requests, outcomes, min_samples=100)
    assert report.unit == "user" and report.verdict == "sequential" and report.notes == []
    comparison = report.comparisons[0]
    sequential = comparison.sequential
    assert sequential is not None and sequential.looks > 50
    assert sequential.p_value <= 1 / sequential.likelihood_ratio + 1e-12  # the running minimum
    assert comparison.significant == (sequential.p_value < comparison.alpha)
    assert sequential.ci_low <= comparison.result.difference <= sequential.ci_high  # type: ignore[union-attr]
    assert comparison.result is not None
    assert sequential.ci_high - sequential.ci_low > comparison.result.ci_high - comparison.result.ci_low
    assert 0 < comparison.mde < comparison.mde_sequential < 0.2
    as_dict = report.to_dict()
    assert as_dict["unit"] == "user" and as_dict["verdict"] == "sequential" and as_dict["mixing_sd"] == 0.2
    assert set(as_dict["comparisons"][0]["sequential"]) >= {
        "p_value",
        "ci_low",
        "ci_high",
        "looks",
        "mixing_sd",
    }
    assert as_dict["comparisons"][0]["mde"] == pytest.approx(comparison.mde)
    fixed = compute_report(exp, requests, outcomes, min_samples=100, verdict="fixed")
    assert fixed.comparisons[0].significant == fixed.comparisons[0].fixed_significant
    assert any("one look" in note for note in fixed.notes)
    with pytest.raises(ABError, match="unknown verdict"):
        compute_report(exp, requests, outcomes, verdict="bayes")


def test_request_unit_says_it_is_anti_conservative() -> None:
    exp = experiment([(3, 50), (4, 50)])
    requests, outcomes = synthetic_log(exp, 200, {3: 0.5, 4: 0.5}, requests_per_user=4)
    report = compute_report(exp, requests, outcomes, unit="request")
    assert report.unit == "request" and report.arms[0].metric.n == report.arms[0].requests
    assert any("anti-conservative" in note for note in report.notes)
    assert "anti-conservative" in render_report(report) and "anti-conservative" in render_report(
        report, markdown=True
    )


def test_requests_without_a_user_are_units_of_their_own() -> None:
    exp = experiment([(3, 50), (4, 50)])
    requests, outcomes = synthetic_log(exp, 100, {3: 0.5, 4: 0.5}, requests_per_user=1)
    anonymous = [
        RequestRecord(f"anon-{i}", T0, exp.expert, 3 + i % 2, exp.id, None, False, 100.0, 20, 30, 200)
        for i in range(40)
    ]
    anonymous_outcomes = [OutcomeRecord(r.request_id, T0, reward=0.5) for r in anonymous]
    mixed = compute_report(exp, requests + anonymous, outcomes + anonymous_outcomes)
    assert mixed.unit == "user"
    assert [arm.metric.n for arm in mixed.arms] == [arm.users + 20 for arm in mixed.arms]
    assert any("40 outcomes of requests without a user id count as one unit each" in n for n in mixed.notes)
    only_anonymous = compute_report(exp, anonymous, anonymous_outcomes)
    assert only_anonymous.unit == "request"  # auto: nobody is sticky, every request is independent
    assert only_anonymous.arms[0].metric.n == 20
