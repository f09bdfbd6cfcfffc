"""Task metrics and error analysis for `moea eval`.

Scores come from the standard libraries (rouge_score for ROUGE-L, sacrebleu for chrF and BLEU); this
module only normalises text, picks the metric that fits a task's `kind`, and adds error analysis
(empty outputs, repetition, length relative to the reference). Every score is in [0, 1] except BLEU
and chrF, which keep sacrebleu's 0–100 scale.

Primary score per task kind (the number eval tables and "routed as % of oracle" use):

- ``classification`` → label accuracy (first label-like word of the output vs the reference label);
- ``math`` → final-number accuracy (the last number in the output equals the reference's last number);
- ``extraction`` → JSON match (both parse as JSON and are equal; otherwise normalised exact match);
- ``generation`` → ROUGE-L F1 (exact match, chrF and BLEU are reported alongside);
- ``qa`` → SQuAD token F1 (max over the references; exact match alongside). The references are the
  response plus, when the task lists it in ``eval_fields``, a ``references`` column of each test row;
- ``ner`` → entity-level micro F1 over ``type: entity`` lines (precision and recall alongside; micro =
  true/false positives and misses counted over the whole test split; per example for paired scores);
- ``code`` → pass@1: the answer's Python (its first ```python block, else the text) runs with the row's
  ``test_setup_code`` and ``test_list`` asserts in a limited child process (:mod:`moe_adapters.code_exec`).
  Rows need those columns (``eval_fields: [test_list, test_setup_code]``); when any row lacks tests the
  headline falls back to ROUGE-L (``metric`` in the result says which one it is).

``qa``, ``ner`` and ``code`` report ROUGE-L and chrF beside their own metric, so tasks stay comparable
with the ``generation`` numbers of earlier evals.
"""

from __future__ import annotations

import json
import math
import re
import string
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from .code_exec import as_tests, extract_code, run_many

PRIMARY_METRIC = {
    "classification": "accuracy",
    "math": "final_number_accuracy",
    "extraction": "json_match",
    "generation": "rougeL",
    "qa": "token_f1",
    "ner": "entity_f1",
    "code": "pass_at_1",
}
"""Which metric is a task kind's headline score."""

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")
_PUNCT = str.maketrans("", "", string.punctuation)


def normalize_text(text: str) -> str:
    """SQuAD-style normalisation: lower case, no punctuation, no articles, single spaces."""
    text = text.lower().translate(_PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, reference: str) -> float:
    """1.0 when the normalised texts are equal."""
    return float(normalize_text(prediction) == normalize_text(reference))


def final_number(text: str) -> float | None:
    """The last number written in `text` ("1,234.5" → 1234.5), or None when there is none."""
    matches = _NUMBER.findall(text)
    if not matches:
        return None
    try:
        return float(matches[-1].replace(",", ""))
    except ValueError:
        return None


def final_number_match(prediction: str, reference: str, rel_tol: float = 1e-6) -> float:
    """1.0 when the last numbers of prediction and reference are equal (within a tiny tolerance)."""
    predicted, expected = final_number(prediction), final_number(reference)
    if predicted is None or expected is None:
        return 0.0
    return float(math.isclose(predicted, expected, rel_tol=rel_tol, abs_tol=1e-9))


def predicted_label(prediction: str, labels: Sequence[str] | None = None) -> str:
    """The label an output names: the first known label word in it, else its first normalised word."""
    words = normalize_text(prediction).split()
    if labels:
        known = {normalize_text(label): label for label in labels}
        for word in words:
            if word in known:
                return normalize_text(known[word])
        joined = " ".join(words)
        for norm in sorted(known, key=len, reverse=True):  # multi-word labels
            if norm and norm in joined:
                return norm
    return words[0] if words else ""


def label_match(prediction: str, reference: str, labels: Sequence[str] | None = None) -> float:
    """1.0 when the output's label equals the normalised reference label."""
    return float(predicted_label(prediction, labels) == normalize_text(reference))


def _parse_json(text: str) -> Any:
    text = text.strip()
    if text.startswith("```"):  # tolerate a fenced block
        text = text.strip("`").removeprefix("json").strip()
    try:
        return json.loads(text)
    except (json.JSONDecodeError, ValueError):
        match = re.search(r"\{.*\}|\[.*\]", text, flags=re.DOTALL)
        if match:
            try:
                return json.loads(match.group(0))
            except (json.JSONDecodeError, ValueError):
                return None
    return None


def _canonical(value: Any) -> Any:
    """JSON value with normalised strings and numbers, so `"Age": "30"` and `30` compare equal."""
    if isinstance(value, dict):
        return {normalize_text(str(k)): _canonical(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_canonical(v) for v in value]
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, int | float):
        return float(value)
    text = str(value)
    number = final_number(text) if _NUMBER.fullmatch(text.strip()) else None
    return number if number is not None else normalize_text(text)


def json_match(prediction: str, reference: str) -> float:
    """1.0 when both parse as JSON and are equal after normalisation; else normalised exact match."""
    expected = _parse_json(reference)
    if expected is None:
        return exact_match(prediction, reference)
    predicted = _parse_json(prediction)
    return float(predicted is not None and _canonical(predicted) == _canonical(expected))


def rouge_l(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Mean ROUGE-L F1 (rouge_score, stemming on)."""
    from rouge_score import rouge_scorer

    _check_lengths(predictions, references)
    if not predictions:
        return float("nan")
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    scores = [
        scorer.score(ref, pred)["rougeL"].fmeasure for pred, ref in zip(predictions, references, strict=True)
    ]
    return sum(scores) / len(scores)


def chrf(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Corpus chrF (sacrebleu, 0–100)."""
    import sacrebleu

    _check_lengths(predictions, references)
    if not predictions:
        return float("nan")
    return float(sacrebleu.corpus_chrf(list(predictions), [list(references)]).score)


def bleu(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Corpus BLEU (sacrebleu defaults: 13a tokenizer, exp smoothing; 0–100)."""
    import sacrebleu

    _check_lengths(predictions, references)
    if not predictions:
        return float("nan")
    return float(sacrebleu.corpus_bleu(list(predictions), [list(references)]).score)


# ------------------------------------------------------------------------------------ real task kinds


def token_f1(prediction: str, reference: str) -> float:
    """SQuAD token F1: overlap of the normalised whitespace tokens (both empty → 1.0, one empty → 0.0)."""
    predicted, expected = normalize_text(prediction).split(), normalize_text(reference).split()
    if not predicted or not expected:
        return float(predicted == expected)
    common = sum((Counter(predicted) & Counter(expected)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(predicted), common / len(expected)
    return 2 * precision * recall / (precision + recall)


def qa_references(reference: str, extra: Mapping[str, Any] | None = None) -> list[str]:
    """The reference plus the row's ``references`` column (a list or one string), without repeats."""
    more = (extra or {}).get("references") or []
    more = [more] if isinstance(more, str) else [str(r) for r in more]
    return list(dict.fromkeys([reference, *more]))


def max_over_references(
    metric: Callable[[str, str], float], prediction: str, references: Sequence[str]
) -> float:
    """The best score of `prediction` against any reference (SQuAD practice)."""
    return max((metric(prediction, r) for r in references), default=0.0)


def qa_scores(
    predictions: Sequence[str], references: Sequence[str], extras: Sequence[Mapping[str, Any]]
) -> dict[str, float]:
    """Mean exact match and token F1, each the best over the example's references."""
    refs = [qa_references(r, e) for r, e in zip(references, extras, strict=True)]
    pairs = list(zip(predictions, refs, strict=True))
    return {
        "exact_match": _mean([max_over_references(exact_match, p, rs) for p, rs in pairs]),
        "token_f1": _mean([max_over_references(token_f1, p, rs) for p, rs in pairs]),
    }


def parse_entities(text: str) -> Counter[tuple[str, str]]:
    """``type: entity`` lines → counts of (type, entity), lower case with single spaces. Lines without a
    colon are not entities; a leading list bullet (``-``, ``*``) is ignored; repeats count twice."""
    entities: Counter[tuple[str, str]] = Counter()
    for line in text.splitlines():
        kind, colon, entity = line.strip().lstrip("-*• ").partition(":")
        kind, entity = " ".join(kind.lower().split()), " ".join(entity.lower().split())
        if colon and kind and entity:
            entities[(kind, entity)] += 1
    return entities


def entity_counts(prediction: str, reference: str) -> tuple[int, int, int]:
    """(true positives, false positives, misses) of the predicted entities against the reference's."""
    predicted, expected = parse_entities(prediction), parse_entities(reference)
    true_positives = sum((predicted & expected).values())
    return true_positives, sum(predicted.values()) - true_positives, sum(expected.values()) - true_positives


def _f1(true_positives: int, false_positives: int, misses: int) -> float:
    """F1 from counts; nothing predicted and nothing expected is a perfect 1.0."""
    denominator = 2 * true_positives + false_positives + misses
    return 2 * true_positives / denominator if denominator else 1.0


def entity_f1(prediction: str, reference: str) -> float:
    """Entity F1 of one example (the per-example score of ``ner``)."""
    return _f1(*entity_counts(prediction, reference))


def entity_scores(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Micro precision, recall and F1: entity counts summed over all examples before dividing."""
    _check_lengths(predictions, references)
    counts = [entity_counts(p, r) for p, r in zip(predictions, references, strict=True)]
    tp, fp, fn = (sum(c[k] for c in counts) for k in range(3))
    return {
        "entity_precision": tp / (tp + fp) if tp + fp else float(fn == 0),
        "entity_recall": tp / (tp + fn) if tp + fn else 1.0,
        "entity_f1": _f1(tp, fp, fn),
    }


def code_passes(predictions: Sequence[str], extras: Sequence[Mapping[str, Any]]) -> list[float | None]:
    """Per example 1.0 / 0.0 when the answer's code passes / fails the row's ``test_list`` (with its
    ``test_setup_code``); None for rows without tests."""
    jobs, rows = [], []
    for i, (prediction, extra) in enumerate(zip(predictions, extras, strict=True)):
        tests = as_tests(extra.get("test_list"))
        if tests:
            jobs.append((extract_code(prediction), tests, str(extra.get("test_setup_code") or "")))
            rows.append(i)
    passes: list[float | None] = [None] * len(predictions)
    for i, outcome in zip(rows, run_many(jobs), strict=True):
        passes[i] = float(outcome.passed)
    return passes


# ------------------------------------------------------------------------------------ error analysis


def repetition_rate(text: str, n: int = 3) -> float:
    """Share of word n-grams that repeat an earlier n-gram of the same output (0 = no loops)."""
    words = text.split()
    grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    if not grams:
        return 0.0
    return 1.0 - len(set(grams)) / len(grams)


def length_ratio(prediction: str, reference: str) -> float:
    """Output words / reference words (reference of zero words counts as one)."""
    return len(prediction.split()) / max(1, len(reference.split()))


def error_analysis(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Empty-output rate, mean 3-gram repetition rate, mean and median length ratio to the reference."""
    _check_lengths(predictions, references)
    if not predictions:
        return {
            "empty_rate": float("nan"),
            "repetition_rate": float("nan"),
            "length_ratio": float("nan"),
            "length_ratio_median": float("nan"),
        }
    ratios = sorted(length_ratio(p, r) for p, r in zip(predictions, references, strict=True))
    return {
        "empty_rate": sum(not p.strip() for p in predictions) / len(predictions),
        "repetition_rate": sum(repetition_rate(p) for p in predictions) / len(predictions),
        "length_ratio": sum(ratios) / len(ratios),
        "length_ratio_median": ratios[len(ratios) // 2],
    }


# ---------------------------------------------------------------------------------------- per task


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def score_task(
    kind: str,
    predictions: Sequence[str],
    references: Sequence[str],
    labels: Sequence[str] | None = None,
    extras: Sequence[Mapping[str, Any]] | None = None,
) -> dict[str, Any]:
    """All metrics that fit `kind`, the headline `score` (named by `metric`, see PRIMARY_METRIC) and
    error analysis.

    `labels` (classification) is the set of valid answers, e.g. every distinct reference of the task;
    None → the distinct references are used. `extras` are the test rows' ``eval_fields`` columns, one
    mapping per example (``references`` for qa, ``test_list``/``test_setup_code`` for code).
    """
    if kind not in PRIMARY_METRIC:
        raise ValueError(f"unknown task kind {kind!r}: use one of {', '.join(PRIMARY_METRIC)}")
    _check_lengths(predictions, references)
    extras = _check_extras(extras, len(predictions))
    pairs = list(zip(predictions, references, strict=True))
    result: dict[str, Any] = {
        "n": float(len(pairs)),
        "exact_match": _mean([exact_match(p, r) for p, r in pairs]),
    }
    if kind == "classification":
        labels = labels if labels is not None else sorted({r.strip() for r in references})
        result["accuracy"] = _mean([label_match(p, r, labels) for p, r in pairs])
    elif kind == "math":
        result["final_number_accuracy"] = _mean([final_number_match(p, r) for p, r in pairs])
    elif kind == "extraction":
        result["json_match"] = _mean([json_match(p, r) for p, r in pairs])
    elif kind == "qa":
        result.update(qa_scores(predictions, references, extras))
    elif kind == "ner":
        result.update(entity_scores(predictions, references))
    elif kind == "code":
        passes = [x for x in code_passes(predictions, extras) if x is not None]
        result["pass_at_1"] = _mean(passes)
        result["rows_with_tests"] = float(len(passes))
    if kind in ("generation", "qa", "ner", "code"):
        result["rougeL"] = rouge_l(predictions, references)
        result["chrf"] = chrf(predictions, references)
    if kind == "generation":
        result["bleu"] = bleu(predictions, references)
    result["metric"] = headline_metric(kind, result)
    result["score"] = result[result["metric"]]
    result.update(error_analysis(predictions, references))
    return result


def headline_metric(kind: str, result: Mapping[str, Any]) -> str:
    """PRIMARY_METRIC[kind], except ``code`` with rows that have no tests: ROUGE-L then (no execution)."""
    if kind == "code" and result.get("rows_with_tests", 0) < result.get("n", 0):
        return "rougeL"
    return PRIMARY_METRIC[kind]


def per_example_scores(
    kind: str,
    predictions: Sequence[str],
    references: Sequence[str],
    labels: Sequence[str] | None = None,
    extras: Sequence[Mapping[str, Any]] | None = None,
) -> list[float]:
    """The headline metric per example (ROUGE-L per pair for generation, and for code without tests in
    every row), e.g. for paired comparisons."""
    _check_lengths(predictions, references)
    extras = _check_extras(extras, len(predictions))
    pairs = list(zip(predictions, references, strict=True))
    if kind == "classification":
        labels = labels if labels is not None else sorted({r.strip() for r in references})
        return [label_match(p, r, labels) for p, r in pairs]
    if kind == "math":
        return [final_number_match(p, r) for p, r in pairs]
    if kind == "extraction":
        return [json_match(p, r) for p, r in pairs]
    if kind == "qa":
        return [
            max_over_references(token_f1, p, qa_references(r, e))
            for (p, r), e in zip(pairs, extras, strict=True)
        ]
    if kind == "ner":
        return [entity_f1(p, r) for p, r in pairs]
    if kind == "code":
        passes = code_passes(predictions, extras)
        if all(x is not None for x in passes):
            return [float(x or 0.0) for x in passes]
    return [rouge_l([p], [r]) for p, r in pairs]


def _check_extras(extras: Sequence[Mapping[str, Any]] | None, n: int) -> Sequence[Mapping[str, Any]]:
    if extras is None:
        return [{}] * n
    if len(extras) != n:
        raise ValueError(f"{len(extras)} extras but {n} predictions: give one mapping per example")
    return extras


def _check_lengths(predictions: Sequence[str], references: Sequence[str]) -> None:
    if len(predictions) != len(references):
        raise ValueError(
            f"{len(predictions)} predictions but {len(references)} references: they must pair up"
        )
