"""Known-answer tests for the eval metrics (case tables, like PEFT's tests)."""

from __future__ import annotations

import math

import pytest

from moe_adapters.metrics import (
    PRIMARY_METRIC,
    bleu,
    chrf,
    error_analysis,
    exact_match,
    final_number,
    final_number_match,
    json_match,
    label_match,
    length_ratio,
    normalize_text,
    per_example_scores,
    repetition_rate,
    rouge_l,
    score_task,
)

NORMALIZE_CASES = [
    ("The  Answer is: Paris!", "answer is paris"),
    ("  an apple, a pear ", "apple pear"),
    ("", ""),
]

EXACT_CASES = [
    ("Paris.", "paris", 1.0),
    ("The Paris", "Paris", 1.0),
    ("Paris, France", "Paris", 0.0),
]

FINAL_NUMBER_CASES = [
    ("41 - 11 = 30", 30.0),
    ("The total is 1,234.5 dollars.", 1234.5),
    ("It drops to -7 degrees", -7.0),
    ("no digits here", None),
    ("2 apples + 3 apples = 5 apples. So 5.", 5.0),
]

FINAL_MATCH_CASES = [
    ("3 * 4 = 12", "12", 1.0),
    ("The answer is 12.0", "12", 1.0),
    ("12 then 13", "12", 0.0),
    ("", "12", 0.0),
]

LABEL_CASES = [
    ("Positive", "positive", ["positive", "negative"], 1.0),
    ("positive.", "positive", None, 1.0),
    ("The sentiment is negative", "negative", ["positive", "negative"], 1.0),
    ("The sentiment is negative", "negative", None, 0.0),  # no label set: first word only
    ("negative", "positive", ["positive", "negative"], 0.0),
    ("", "positive", ["positive", "negative"], 0.0),
]

JSON_CASES = [
    ('{"name":"Ana Li","age":30,"city":"Oslo"}', '{"name": "Ana Li", "age": 30, "city": "Oslo"}', 1.0),
    ('{"city":"oslo","name":"ana li","age":"30"}', '{"name":"Ana Li","age":30,"city":"Oslo"}', 1.0),
    (
        '```json\n{"name":"Ana Li","age":30,"city":"Oslo"}\n```',
        '{"name":"Ana Li","age":30,"city":"Oslo"}',
        1.0,
    ),
    ('Sure! {"name":"Ana Li","age":30,"city":"Oslo"}', '{"name":"Ana Li","age":30,"city":"Oslo"}', 1.0),
    ('{"name":"Ana Li","age":31,"city":"Oslo"}', '{"name":"Ana Li","age":30,"city":"Oslo"}', 0.0),
    ('{"name":"Ana Li"', '{"name":"Ana Li","age":30,"city":"Oslo"}', 0.0),
    ("plain text", "Plain text.", 1.0),  # reference is not JSON → exact match
]


@pytest.mark.parametrize(("text", "expected"), NORMALIZE_CASES)
def test_normalize_text(text: str, expected: str) -> None:
    assert normalize_text(text) == expected


@pytest.mark.parametrize(("prediction", "reference", "expected"), EXACT_CASES)
def test_exact_match(prediction: str, reference: str, expected: float) -> None:
    assert exact_match(prediction, reference) == expected


@pytest.mark.parametrize(("text", "expected"), FINAL_NUMBER_CASES)
def test_final_number(text: str, expected: float | None) -> None:
    assert final_number(text) == expected


@pytest.mark.parametrize(("prediction", "reference", "expected"), FINAL_MATCH_CASES)
def test_final_number_match(prediction: str, reference: str, expected: float) -> None:
    assert final_number_match(prediction, reference) == expected


@pytest.mark.parametrize(("prediction", "reference", "labels", "expected"), LABEL_CASES)
def test_label_match(prediction: str, reference: str, labels: list[str] | None, expected: float) -> None:
    assert label_match(prediction, reference, labels) == expected


@pytest.mark.parametrize(("prediction", "reference", "expected"), JSON_CASES)
def test_json_match(prediction: str, reference: str, expected: float) -> None:
    assert json_match(prediction, reference) == expected


def test_rouge_l_known_values() -> None:
    assert rouge_l(["the cat sat on the mat"], ["the cat sat on the mat"]) == pytest.approx(1.0)
    # LCS 3 of 3 predicted and 6 reference tokens: P=1, R=0.5, F1=2/3.
    assert rouge_l(["the cat sat"], ["the cat sat on the mat"]) == pytest.approx(2 / 3)
    assert rouge_l(["dogs bark"], ["the cat sat"]) == pytest.approx(0.0)
    assert rouge_l(["a b", "x"], ["a b", "y"]) == pytest.approx(0.5)  # mean over pairs


def test_chrf_and_bleu_known_values() -> None:
    same = ["the quick brown fox jumps over the lazy dog"]
    assert chrf(same, same) == pytest.approx(100.0)
    assert bleu(same, same) == pytest.approx(100.0)
    assert bleu(["zzz yyy xxx www"], ["the quick brown fox"]) == pytest.approx(0.0)
    assert 0.0 < chrf(["the quick brown cat"], ["the quick brown fox"]) < 100.0
    assert math.isnan(bleu([], []))


def test_error_analysis_flags_empty_repetitive_and_long_outputs() -> None:
    assert repetition_rate("a b c a b c a b c") == pytest.approx(1 - 3 / 7)
    assert repetition_rate("one two three four") == 0.0
    assert repetition_rate("") == 0.0
    assert length_ratio("one two three four", "one two") == 2.0
    analysis = error_analysis(["", "x y", "a b c a b c a b c"], ["r", "r s", "r s t"])
    assert analysis["empty_rate"] == pytest.approx(1 / 3)
    assert analysis["length_ratio"] == pytest.approx((0 + 1 + 3) / 3)
    assert analysis["length_ratio_median"] == pytest.approx(1.0)
    assert analysis["repetition_rate"] == pytest.approx((1 - 3 / 7) / 3)


SCORE_TASK_CASES = [
    ("classification", ["positive", "Negative.", "positive"], ["positive", "negative", "negative"], 2 / 3),
    ("math", ["2 + 2 = 4", "10 / 2 = 6"], ["4", "5"], 0.5),
    ("extraction", ['{"a": 1}', '{"a": 2}'], ['{"a": 1}', '{"a": 1}'], 0.5),
    ("generation", ["2002-11-28", "1999-01-02"], ["2002-11-28", "1999-01-02"], 1.0),
]


@pytest.mark.parametrize(("kind", "predictions", "references", "expected"), SCORE_TASK_CASES)
def test_score_task_headline_by_kind(
    kind: str, predictions: list[str], references: list[str], expected: float
) -> None:
    result = score_task(kind, predictions, references)
    assert result["score"] == pytest.approx(expected)
    assert result[PRIMARY_METRIC[kind]] == result["score"]
    assert result["n"] == len(predictions)
    assert {"empty_rate", "repetition_rate", "length_ratio"} <= set(result)
    per_example = per_example_scores(kind, predictions, references)
    assert sum(per_example) / len(per_example) == pytest.approx(expected)


def test_score_task_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="unknown task kind"):
        score_task("poetry", ["a"], ["a"])
    with pytest.raises(ValueError, match="must pair up"):
        score_task("math", ["1", "2"], ["1"])
