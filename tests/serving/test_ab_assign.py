"""A/B assignment: sticky per user, weights honoured, salts independent, and a light import."""

from __future__ import annotations

import math
import os
import random
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from scipy import stats

from serving.ab import assign
from serving.ab.assign import NUM_BUCKETS, ABError, assign_arm, parse_arm, user_bucket, validate_arms

from .ab_fixtures import experiment


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
    monkeypatch.setattr(assign, "_anonymous_rng", random.Random(1234))
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
    validate_arms([(3, 90), (4, 10)])
    with pytest.raises(ABError, match="distinct"):
        validate_arms([(3, 90), (3, 10)])
    with pytest.raises(ABError, match="more than 0"):
        validate_arms([(3, 0), (4, 0)])


def test_importing_assign_loads_no_heavy_library() -> None:
    """The gateway imports serving.ab.assign for every request's arm: keep the statistics stack out of it."""
    heavy = {"scipy", "numpy", "rich", "matplotlib"}
    code = (
        f"import sys, serving.ab.assign; print(sorted({{m.split('.')[0] for m in sys.modules}} & {heavy!r}))"
    )
    repo_root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(repo_root), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=repo_root, check=True
    )
    assert result.stdout.strip() == "[]"
