"""Known-answer tests for the eval metrics (case tables, like PEFT's tests)."""

from __future__ import annotations

import math

import pytest

from moe_adapters.code_exec import as_tests, build_program, extract_code, run_tests
from moe_adapters.metrics import (
    PRIMARY_METRIC,
    bleu,
    chrf,
    code_passes,
    entity_counts,
    entity_f1,
    entity_scores,
    error_analysis,
    exact_match,
    final_number,
    final_number_match,
    json_match,
    label_match,
    length_ratio,
    normalize_text,
    parse_entities,
    per_example_scores,
    qa_references,
    repetition_rate,
    rouge_l,
    score_task,
    token_f1,
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


# ---------------------------------------------------------------------------- qa: SQuAD token F1 / EM

TOKEN_F1_CASES = [
    ("Paris", "paris.", 1.0),
    ("The Eiffel Tower", "Eiffel Tower", 1.0),  # articles and case do not count
    # 2 common of 3 predicted and 2 reference tokens: P=2/3, R=1, F1=0.8.
    ("in Paris France", "Paris, France", 0.8),
    # 1 common of 2 and 4: P=1/2, R=1/4, F1=1/3.
    ("red car", "a big red bus stop", 1 / 3),
    ("nothing in common", "Paris", 0.0),
    ("", "Paris", 0.0),
    ("the", "a", 1.0),  # both normalise to nothing
]


@pytest.mark.parametrize(("prediction", "reference", "expected"), TOKEN_F1_CASES)
def test_token_f1(prediction: str, reference: str, expected: float) -> None:
    assert token_f1(prediction, reference) == pytest.approx(expected)


def test_qa_scores_take_the_best_reference() -> None:
    assert qa_references("1990", {"references": ["1990", "in 1990"]}) == ["1990", "in 1990"]
    assert qa_references("x", {"references": "y"}) == ["x", "y"]
    assert qa_references("x", None) == ["x"]
    extras = [{"references": ["Denver Broncos", "Broncos"]}, {}]
    result = score_task("qa", ["the Broncos", "blue sky today"], ["Denver Broncos", "sky"], extras=extras)
    # row 1: EM 1 against "Broncos"; row 2: EM 0, F1 = 2·(1/3·1)/(1/3+1) = 0.5.
    assert result["exact_match"] == pytest.approx(0.5)
    assert result["token_f1"] == pytest.approx(0.75)
    assert result["score"] == result["token_f1"] and result["metric"] == "token_f1"
    assert {"rougeL", "chrf"} <= set(result)  # reported beside the QA metrics
    per_example = per_example_scores(
        "qa", ["the Broncos", "blue sky today"], ["Denver Broncos", "sky"], extras=extras
    )
    assert per_example == pytest.approx([1.0, 0.5])


# ------------------------------------------------------------------------------ ner: entity micro F1

PARSE_ENTITY_CASES = [
    ("person: Allah\nperson: Sulaiman", {("person", "allah"): 1, ("person", "sulaiman"): 1}),
    (
        "  Location :  New   York \n- group: The Beatles",
        {("location", "new york"): 1, ("group", "the beatles"): 1},
    ),
    ("creative-work: Star Wars: Episode IV", {("creative-work", "star wars: episode iv"): 1}),
    ("no entities here\nperson:\n: x", {}),
    ("person: Bo\nperson: bo", {("person", "bo"): 2}),
]


@pytest.mark.parametrize(("text", "expected"), PARSE_ENTITY_CASES)
def test_parse_entities(text: str, expected: dict[tuple[str, str], int]) -> None:
    assert dict(parse_entities(text)) == expected


ENTITY_CASES = [
    # (prediction, reference, (tp, fp, fn), per-example F1)
    ("person: Ann\nlocation: Oslo", "person: ann\nlocation: oslo", (2, 0, 0), 1.0),
    ("person: Ann\nperson: Oslo", "person: Ann\nlocation: Oslo", (1, 1, 1), 0.5),  # wrong type = FP + FN
    ("person: Ann", "person: Ann\ngroup: Abba\nproduct: iPhone", (1, 0, 2), 0.5),
    ("", "person: Ann", (0, 0, 1), 0.0),
    ("", "", (0, 0, 0), 1.0),
]


@pytest.mark.parametrize(("prediction", "reference", "counts", "f1"), ENTITY_CASES)
def test_entity_counts_and_f1(
    prediction: str, reference: str, counts: tuple[int, int, int], f1: float
) -> None:
    assert entity_counts(prediction, reference) == counts
    assert entity_f1(prediction, reference) == pytest.approx(f1)


def test_entity_scores_are_micro_averaged() -> None:
    predictions = [p for p, _, _, _ in ENTITY_CASES]
    references = [r for _, r, _, _ in ENTITY_CASES]
    # Summed counts: tp 4, fp 1, fn 4 → P 4/5, R 4/8, F1 8/13 (the mean of per-example F1s would be 0.6).
    scores = entity_scores(predictions, references)
    assert scores == pytest.approx({"entity_precision": 0.8, "entity_recall": 0.5, "entity_f1": 8 / 13})
    result = score_task("ner", predictions, references)
    assert result["score"] == pytest.approx(8 / 13) and result["metric"] == "entity_f1"
    assert per_example_scores("ner", predictions, references) == pytest.approx([f for *_, f in ENTITY_CASES])


# ------------------------------------------------------------------------------------ code: pass@1

EXTRACT_CASES = [
    ("def f():\n    return 1", "def f():\n    return 1"),
    ("Here:\n```python\ndef f():\n    return 1\n```\nDone.", "def f():\n    return 1"),
    ("```\nx = 1\n```\n```py\ny = 2\n```", "y = 2"),  # a python block wins over an unlabelled one
    ("```sh\nls\n```", "ls"),
    ("```python\ndef f():\n    return 1", "def f():\n    return 1"),  # cut off before the closing fence
]


@pytest.mark.parametrize(("text", "expected"), EXTRACT_CASES)
def test_extract_code(text: str, expected: str) -> None:
    assert extract_code(text) == expected


def test_build_program_and_test_columns() -> None:
    assert build_program("def f(): pass", ["assert f() is None"], "import math") == (
        "import math\n\ndef f(): pass\n\nassert f() is None\n"
    )
    assert as_tests(["assert 1", " "]) == ("assert 1",)
    assert as_tests("assert 1") == ("assert 1",)
    assert as_tests(None) == ()


RUN_CASES = [
    # (code, tests, setup, passed, reason contains)
    ("def add(a, b):\n    return a + b", ("assert add(1, 2) == 3", "assert add(0, 0) == 0"), "", True, ""),
    ("def add(a, b):\n    return a - b", ("assert add(1, 2) == 3",), "", False, "AssertionError"),
    ("def f(:", ("assert f()",), "", False, "SyntaxError"),
    ("def g():\n    return K", ("assert g() == 7",), "K = 7", True, ""),  # test_setup_code runs first
    ("while True:\n    pass", ("assert True",), "", False, "timeout"),
    ("import socket\nsocket.create_connection(('127.0.0.1', 9))", (), "", False, "not allowed"),
    ("import os\nos.system('true')", (), "", False, "not allowed"),
    ("x = bytearray(4 << 30)", (), "", False, "MemoryError"),
    (
        "import os\nassert os.listdir('.') == [] and 'VIRTUAL_ENV' not in os.environ",
        (),
        "",
        True,
        "",
    ),
]


@pytest.mark.parametrize(("code", "tests", "setup", "passed", "reason"), RUN_CASES)
def test_run_tests_isolated_and_limited(
    code: str, tests: tuple[str, ...], setup: str, passed: bool, reason: str
) -> None:
    outcome = run_tests(code, tests, setup, timeout_s=1.5)
    assert outcome.passed is passed
    assert reason in outcome.reason


def test_code_pass_at_1_and_rouge_fallback() -> None:
    tests = {"test_list": ["assert sq(3) == 9", "assert sq(0) == 0"], "test_setup_code": ""}
    predictions = ["```python\ndef sq(x):\n    return x * x\n```", "def sq(x):\n    return x + x"]
    references = ["def sq(x):\n    return x ** 2"] * 2
    assert code_passes(predictions, [tests, {}]) == [1.0, None]
    result = score_task("code", predictions, references, extras=[tests, tests])
    assert result["pass_at_1"] == 0.5 and result["score"] == 0.5 and result["metric"] == "pass_at_1"
    assert {"rougeL", "chrf"} <= set(result)
    assert per_example_scores("code", predictions, references, extras=[tests, tests]) == [1.0, 0.0]
    # A row without tests: no execution headline; ROUGE-L is the score and says so.
    fallback = score_task("code", predictions, references, extras=[tests, {}])
    assert fallback["metric"] == "rougeL" and fallback["score"] == fallback["rougeL"]
    assert fallback["rows_with_tests"] == 1 and fallback["pass_at_1"] == 1.0
    no_tests = score_task("code", predictions, references)
    assert no_tests["metric"] == "rougeL" and math.isnan(no_tests["pass_at_1"])
    with pytest.raises(ValueError, match="one mapping per example"):
        score_task("code", predictions, references, extras=[tests])
