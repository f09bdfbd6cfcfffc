"""Temperature sampling math, edge cases and the resumable TaskSampler."""

from __future__ import annotations

import math

import pytest

from moe_adapters.sampling import SamplingError, TaskSampler, temperature_probabilities


@pytest.mark.parametrize(
    ("sizes", "temperature", "cap", "expected"),
    [
        ({"a": 100, "b": 300}, 1.0, None, {"a": 0.25, "b": 0.75}),  # T=1: size-proportional
        ({"a": 100, "b": 400}, 2.0, None, {"a": 1 / 3, "b": 2 / 3}),  # sqrt: 10 vs 20
        ({"a": 100, "b": 10_000}, math.inf, None, {"a": 0.5, "b": 0.5}),  # T→∞: uniform
        ({"a": 100, "b": 10_000}, 1.0, 100, {"a": 0.5, "b": 0.5}),  # cap before temperature
        ({"a": 50, "b": 10_000}, 1.0, 100, {"a": 1 / 3, "b": 2 / 3}),
        ({"a": 1, "b": 4, "c": 16}, 2.0, None, {"a": 1 / 7, "b": 2 / 7, "c": 4 / 7}),
        ({"only": 7}, 0.5, None, {"only": 1.0}),
    ],
)
def test_temperature_probabilities_cases(sizes, temperature, cap, expected):
    probs = temperature_probabilities(sizes, temperature, cap)
    assert probs.keys() == expected.keys()
    for name, p in expected.items():
        assert probs[name] == pytest.approx(p, rel=1e-9)
    assert sum(probs.values()) == pytest.approx(1.0)


def test_large_temperature_approaches_uniform():
    probs = temperature_probabilities({"a": 10, "b": 100_000}, temperature=1000.0)
    assert probs["a"] == pytest.approx(0.5, abs=0.01)


def test_tiny_temperature_does_not_overflow():
    probs = temperature_probabilities({"a": 1000, "b": 999}, temperature=1e-4)  # ratio e^10
    assert probs["a"] > 0.99 and math.isfinite(probs["b"])


@pytest.mark.parametrize(
    ("sizes", "temperature", "cap", "message"),
    [
        ({"a": 1}, 0.0, None, "temperature must be > 0"),
        ({"a": 1}, -1.0, None, "temperature must be > 0"),
        ({"a": 1}, math.nan, None, "temperature must be > 0"),
        ({}, 1.0, None, "empty mixture"),
        ({"a": 5, "ghost": 0}, 1.0, None, "ghost"),
        ({"a": 5}, 1.0, 0, "cap must be >= 1"),
    ],
)
def test_temperature_probabilities_errors(sizes, temperature, cap, message):
    with pytest.raises(SamplingError, match=message):
        temperature_probabilities(sizes, temperature, cap)


def test_sampler_is_deterministic_and_follows_probabilities():
    probs = {"a": 0.2, "b": 0.8}
    first = TaskSampler(probs, seed=3)
    second = TaskSampler(probs, seed=3)
    seq1 = [first.sample() for _ in range(5000)]
    seq2 = [second.sample() for _ in range(5000)]
    assert seq1 == seq2
    assert seq1.count("a") / len(seq1) == pytest.approx(0.2, abs=0.02)


def test_sampler_different_seeds_differ():
    a = TaskSampler({"a": 0.5, "b": 0.5}, seed=1)
    b = TaskSampler({"a": 0.5, "b": 0.5}, seed=2)
    assert [a.sample() for _ in range(64)] != [b.sample() for _ in range(64)]


def test_remove_renormalizes_and_stops_sampling():
    sampler = TaskSampler({"a": 0.5, "b": 0.3, "c": 0.2}, seed=0)
    sampler.remove("a")
    assert sampler.probabilities == pytest.approx({"b": 0.6, "c": 0.4})
    assert "a" not in {sampler.sample() for _ in range(500)}
    sampler.remove("a")  # idempotent
    sampler.remove("b")
    assert {sampler.sample() for _ in range(20)} == {"c"}
    sampler.remove("c")
    assert len(sampler) == 0
    with pytest.raises(SamplingError, match="all tasks were removed"):
        sampler.sample()
    with pytest.raises(SamplingError, match="unknown task 'zzz'"):
        sampler.remove("zzz")


def test_state_dict_round_trip_continues_exact_sequence():
    sampler = TaskSampler({"a": 0.3, "b": 0.3, "c": 0.4}, seed=11)
    _ = [sampler.sample() for _ in range(37)]
    sampler.remove("b")
    state = sampler.state_dict()
    expected = [sampler.sample() for _ in range(200)]
    restored = TaskSampler({"a": 0.3, "b": 0.3, "c": 0.4}, seed=999)
    restored.load_state_dict(state)
    assert [restored.sample() for _ in range(200)] == expected
    assert restored.probabilities == sampler.probabilities
