"""Task metrics and error analysis for `moea eval`.

Scores come from the standard libraries (rouge_score for ROUGE-L, sacrebleu for chrF and BLEU); this
module only normalises text, picks the metric that fits a task's `kind`, and adds error analysis
(empty outputs, repetition, length relative to the reference). Every score is in [0, 1] except BLEU
and chrF, which keep sacrebleu's 0–100 scale.

Primary score per task kind (the number eval tables and "routed as % of oracle" use):

- ``classification`` → label accuracy (first label-like word of the output vs the reference label);
- ``math`` → final-number accuracy (the last number in the output equals the reference's last number);
- ``extraction`` → JSON match (both parse as JSON and are equal; otherwise normalised exact match);
- ``generation`` → ROUGE-L F1 (exact match, chrF and BLEU are reported alongside).
"""

from __future__ import annotations

import json
import math
import re
import string
from collections.abc import Sequence
from typing import Any

PRIMARY_METRIC = {
    "classification": "accuracy",
    "math": "final_number_accuracy",
    "extraction": "json_match",
    "generation": "rougeL",
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
    kind: str, predictions: Sequence[str], references: Sequence[str], labels: Sequence[str] | None = None
) -> dict[str, float]:
    """All metrics that fit `kind`, the headline `score` (see PRIMARY_METRIC) and error analysis.

    `labels` (classification) is the set of valid answers, e.g. every distinct reference of the task;
    None → the distinct references are used.
    """
    if kind not in PRIMARY_METRIC:
        raise ValueError(f"unknown task kind {kind!r}: use one of {', '.join(PRIMARY_METRIC)}")
    _check_lengths(predictions, references)
    pairs = list(zip(predictions, references, strict=True))
    result: dict[str, float] = {
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
    else:
        result["rougeL"] = rouge_l(predictions, references)
        result["chrf"] = chrf(predictions, references)
        result["bleu"] = bleu(predictions, references)
    result["score"] = result[PRIMARY_METRIC[kind]]
    result.update(error_analysis(predictions, references))
    return result


def per_example_scores(
    kind: str, predictions: Sequence[str], references: Sequence[str], labels: Sequence[str] | None = None
) -> list[float]:
    """The primary metric per example (ROUGE-L per pair for generation), e.g. for paired comparisons."""
    _check_lengths(predictions, references)
    pairs = list(zip(predictions, references, strict=True))
    if kind == "classification":
        labels = labels if labels is not None else sorted({r.strip() for r in references})
        return [label_match(p, r, labels) for p, r in pairs]
    if kind == "math":
        return [final_number_match(p, r) for p, r in pairs]
    if kind == "extraction":
        return [json_match(p, r) for p, r in pairs]
    return [rouge_l([p], [r]) for p, r in pairs]


def _check_lengths(predictions: Sequence[str], references: Sequence[str]) -> None:
    if len(predictions) != len(references):
        raise ValueError(
            f"{len(predictions)} predictions but {len(references)} references: they must pair up"
        )
