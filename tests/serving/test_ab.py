"""A/B assignment, statistics (checked against scipy), the report, its rendering and its plot."""

from __future__ import annotations

import math
import random
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from registry.models import Arm, ExperimentView, OutcomeRecord, RequestRecord
from serving import ab
from serving.ab import (
    NUM_BUCKETS,
    ABError,
    assign_arm,
    compute_report,
    mean_confidence_interval,
    parse_arm,
    plot_report,
    proportion_confidence_interval,
    render_report,
    srm_check,
    two_proportion_z_test,
    user_bucket,
    welch_t_test,
)

T0 = datetime(2025, 1, 1, tzinfo=UTC)


def experiment(
    arms: list[tuple[int, float]],
    metric: str = "reward",
    salt: str = "salt-1",
    shadow: int | None = None,
    expert: str = "summarize",
) -> ExperimentView:
    return ExperimentView(
        id=7,
        expert=expert,
        arms=[Arm(v, w) for v, w in arms],
        metric=metric,
        salt=salt,
        status="running",
        shadow_version=shadow,
        started_at=T0,
        stopped_at=None,
        winner=None,
    )


# ---------------------------------------------------------------------------------------- assignment


def test_user_bucket_is_pinned_sha256() -> None:
    # Changing the hash would silently move every user to another arm mid-experiment.
    assert user_bucket("salt-1", "alice") == 5494
    assert user_bucket("salt-1", "bob") == 7820
    assert all(0 <= user_bucket("s", f"u{i}") < NUM_BUCKETS for i in range(1000))
    assert user_bucket("ab", "c") != user_bucket("a", "bc")


def test_assignment_is_sticky_per_user() -> None:
    exp = experiment([(3, 50), (4, 50)])
    for user in (f"user-{i}" for i in range(500)):
        first = assign_arm(exp, user)
        assert all(assign_arm(exp, user) == first for _ in range(5))
        # A fresh view of the same experiment (another gateway replica) agrees.
        assert assign_arm(experiment([(3, 50), (4, 50)]), user) == first


@pytest.mark.parametrize("weights", [(90, 10), (50, 50), (50, 30, 20), (1, 1, 1, 1)])
def test_weight_split_over_20k_users_matches_weights(weights: tuple[float, ...]) -> None:
    arms = [(version, weight) for version, weight in zip(range(3, 3 + len(weights)), weights, strict=True)]
    exp = experiment(arms)
    counts = Counter(assign_arm(exp, f"user-{i}") for i in range(20_000))
    observed = [counts[version] for version, _ in arms]
    expected = [20_000 * w / sum(weights) for w in weights]
    assert sum(observed) == 20_000
    assert stats.chisquare(observed, expected).pvalue > 0.001
    for got, want in zip(observed, expected, strict=True):
        assert abs(got - want) < 5 * math.sqrt(want)


def test_salt_reshuffles_users() -> None:
    users = [f"user-{i}" for i in range(10_000)]
    a, b = experiment([(3, 50), (4, 50)], salt="one"), experiment([(3, 50), (4, 50)], salt="two")
    moved = sum(assign_arm(a, u) != assign_arm(b, u) for u in users) / len(users)
    assert 0.45 < moved < 0.55  # independent 50/50 assignments disagree half the time


def test_ramping_up_treatment_never_moves_treatment_users_back() -> None:
    users = [f"user-{i}" for i in range(5000)]
    before = {u: assign_arm(experiment([(3, 90), (4, 10)]), u) for u in users}
    after = {u: assign_arm(experiment([(3, 50), (4, 50)]), u) for u in users}
    assert all(after[u] == 4 for u in users if before[u] == 4)
    assert sum(1 for u in users if before[u] == 3 and after[u] == 4) > 1000


def test_zero_weight_arm_gets_no_users() -> None:
    exp = experiment([(3, 1), (4, 0), (5, 1)])
    assert 4 not in {assign_arm(exp, f"u{i}") for i in range(5000)}


def test_anonymous_requests_are_assigned_per_request(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ab, "_anonymous_rng", random.Random(1234))
    exp = experiment([(3, 80), (4, 20)])
    for anonymous in (None, ""):
        counts = Counter(assign_arm(exp, anonymous) for _ in range(10_000))
        assert set(counts) == {3, 4}
        assert stats.chisquare([counts[3], counts[4]], [8000, 2000]).pvalue > 0.001


@pytest.mark.parametrize(
    ("spec", "expected"),
    [("3:90", (3, 90.0)), ("4:10", (4, 10.0)), ("12:0.5", (12, 0.5)), ("2:1e-3", (2, 0.001))],
)
def test_parse_arm(spec: str, expected: tuple[int, float]) -> None:
    assert parse_arm(spec) == expected


@pytest.mark.parametrize(
    "spec", ["3", "3:", ":10", "a:10", "0:10", "-1:5", "3:-1", "3:0", "3:nan", "3:inf", "3:x"]
)
def test_parse_arm_rejects(spec: str) -> None:
    with pytest.raises(ABError, match="VERSION:WEIGHT"):
        parse_arm(spec)


def test_validate_arms() -> None:
    ab.validate_arms([(3, 90), (4, 10)])
    with pytest.raises(ABError, match="distinct"):
        ab.validate_arms([(3, 90), (3, 10)])
    with pytest.raises(ABError, match="more than 0"):
        ab.validate_arms([(3, 0), (4, 0)])


# ---------------------------------------------------------------------------------------- statistics

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


# ---------------------------------------------------------------------------------------- report


def synthetic_log(
    exp: ExperimentView,
    n_users: int,
    reward_by_version: dict[int, float],
    *,
    seed: int = 0,
    outcome_share: float = 1.0,
    requests_per_user: int = 2,
    skew_drop: tuple[int, float] | None = None,
) -> tuple[list[RequestRecord], list[OutcomeRecord]]:
    """Users assigned by assign_arm; rewards ~ N(mean of their version, 0.2); thumbs = reward > 0.5."""
    rng = np.random.default_rng(seed)
    requests, outcomes = [], []
    for user_index in range(n_users):
        user = f"user-{user_index}"
        version = assign_arm(exp, user)
        if skew_drop and version == skew_drop[0] and rng.random() < skew_drop[1]:
            continue  # this arm loses users (a logging bug): the split no longer matches
        for turn in range(requests_per_user):
            request_id = f"chatcmpl-{user_index}-{turn}"
            requests.append(
                RequestRecord(
                    request_id=request_id,
                    created_at=T0,
                    expert=exp.expert,
                    version=version,
                    experiment_id=exp.id,
                    user=user,
                    routed=False,
                    latency_ms=float(100 + 10 * version + rng.normal(0, 5)),
                    prompt_tokens=20,
                    completion_tokens=30 + version,
                    status_code=200,
                )
            )
            if rng.random() < outcome_share:
                reward = float(rng.normal(reward_by_version[version], 0.2))
                outcomes.append(
                    OutcomeRecord(request_id, T0 + timedelta(seconds=1), reward=reward, thumbs=reward > 0.5)
                )
    return requests, outcomes


def test_report_per_arm_numbers() -> None:
    exp = experiment([(3, 50), (4, 50)])
    requests, outcomes = synthetic_log(exp, 400, {3: 0.5, 4: 0.5})
    # An anonymous request, an error and a corrected reward (the latest one counts).
    requests.append(RequestRecord("anon-1", T0, exp.expert, 3, exp.id, None, True, 500.0, 5, 5, 500))
    outcomes.append(OutcomeRecord("anon-1", T0, reward=0.0))
    outcomes.append(OutcomeRecord("anon-1", T0 + timedelta(minutes=1), reward=1.0))
    report = compute_report(exp, requests, outcomes, min_samples=10)
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
    assert report.comparisons[0].significant  # the effect is obvious…
    assert report.recommendation.decision == "insufficient-data"  # …but the sample is too small
    assert report.recommendation.winner is None
    assert "100 outcomes per arm" in report.recommendation.text


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
    report = compute_report(exp, requests, outcomes, min_samples=50)
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


def test_render_and_plot(tmp_path: Path) -> None:
    import matplotlib.image

    exp = experiment([(3, 50), (4, 50)], shadow=5)
    requests, outcomes = synthetic_log(exp, 300, {3: 0.5, 4: 0.6})
    report = compute_report(exp, requests, outcomes, min_samples=100)
    text = render_report(report)
    for needle in (
        "summarize@3",
        "control",
        "summarize@4",
        "treatment",
        "welch t",
        "Recommendation:",
        "Sample ratio",
    ):
        assert needle in text
    markdown = render_report(report, markdown=True)
    assert markdown.startswith("## A/B report") and "| Arm | Role |" in markdown
    png = plot_report(report, tmp_path / "plots" / "ab.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    height, width, _ = matplotlib.image.imread(png).shape
    assert width > 800 and height > 300


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
    per_request = compute_report(exp, requests, outcomes, min_samples=50)
    per_user = compute_report(exp, requests, outcomes, min_samples=50, unit="user")
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
