"""Paired differences between two systems on the same test rows, with a bootstrap confidence interval.

``moea eval`` asks every system the same rows, so the honest question "is A better than B" is about the
paired difference of their headline scores, not about two scores read side by side. The interval is the
percentile bootstrap over test rows (rows drawn with replacement, the same draw for both systems); the
mean over tasks resamples each task's rows on its own (stratified), as the mean weighs tasks equally.

Every headline metric is a ratio of per-row sums (:func:`row_stats`): a mean of per-row scores
(``[score, 1]`` per row), or for ``ner`` the micro entity F1 from per-row (true positives, false
positives, misses). :func:`headline` of the summed rows is exactly ``score_task``'s ``score`` (tested), so
the point estimate is the reported difference and a resample is the same metric on other rows.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from .eval_plan import GenerationPlan
from .eval_types import EvalCase, system_rank
from .metrics import entity_counts, per_example_scores

RESAMPLES = 2000
"""Bootstrap resamples per comparison."""
LEVEL = 0.95
"""Two-sided confidence level of the interval."""
SEED = 0
"""The resampling seed: the same report from the same outputs."""
_CHUNK = 250  # resamples drawn at once (bounds memory on large test sets)


def row_stats(
    kind: str,
    predictions: Sequence[str],
    references: Sequence[str],
    labels: Sequence[str] | None = None,
    extras: Sequence[Mapping[str, Any]] | None = None,
) -> np.ndarray:
    """Per-row statistics whose column sums give the headline (:func:`headline`); shape ``(rows, k)``."""
    if kind == "ner":
        return np.array([entity_counts(p, r) for p, r in zip(predictions, references, strict=True)], float)
    values = per_example_scores(kind, predictions, references, labels, extras)
    return np.array([[v, 1.0] for v in values], float).reshape(len(values), 2)


def headline(kind: str, sums: np.ndarray) -> np.ndarray:
    """The headline metric from summed :func:`row_stats` (last axis: the statistics)."""
    if kind == "ner":
        tp, fp, fn = sums[..., 0], sums[..., 1], sums[..., 2]
        denominator = 2 * tp + fp + fn
        return np.where(denominator > 0, 2 * tp / np.maximum(denominator, 1e-12), 1.0)
    return sums[..., 0] / np.maximum(sums[..., 1], 1e-12)


def _resampled_differences(kind: str, a: np.ndarray, b: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    n = len(a)
    out = []
    for start in range(0, RESAMPLES, _CHUNK):
        weights = rng.multinomial(n, np.full(n, 1.0 / n), size=min(_CHUNK, RESAMPLES - start)).astype(float)
        out.append(headline(kind, weights @ a) - headline(kind, weights @ b))
    return np.concatenate(out)


def _interval(point: float, draws: np.ndarray) -> dict[str, float]:
    low, high = np.quantile(draws, [(1 - LEVEL) / 2, (1 + LEVEL) / 2])
    return {"diff": float(point), "ci_low": float(low), "ci_high": float(high)}


def paired_differences(tasks: Mapping[str, tuple[str, np.ndarray, np.ndarray]]) -> dict[str, Any]:
    """``{tasks: {task: {diff, ci_low, ci_high, n}}, mean: {diff, ci_low, ci_high}}`` of system A minus
    system B, from each task's ``(kind, A's row_stats, B's row_stats)`` on the same rows in the same
    order. Tasks without rows are left out; ``mean`` is None without any task."""
    rng = np.random.default_rng(SEED)
    per_task, points, draws = {}, [], []
    for name, (kind, a, b) in tasks.items():
        if len(a) != len(b):
            raise ValueError(f"task {name}: {len(a)} rows for one system but {len(b)} for the other")
        if not len(a):
            continue
        point = float(headline(kind, a.sum(0)) - headline(kind, b.sum(0)))
        resampled = _resampled_differences(kind, a, b, rng)
        per_task[name] = _interval(point, resampled) | {"n": len(a)}
        points.append(point)
        draws.append(resampled)
    mean = _interval(float(np.mean(points)), np.mean(draws, axis=0)) if points else None
    return {"tasks": per_task, "mean": mean}


PAIRED_REFERENCE = "multitask"
"""The system every other one is compared with: the one multi-task LoRA (``moea eval --multitask``)."""


def paired_report(
    cases: Sequence[EvalCase],
    plan: GenerationPlan,
    texts: Sequence[str],
    task_rows: Mapping[str, list[int]],
    tasks: Mapping[str, dict[str, Any]],
) -> dict[str, Any] | None:
    """Every system minus :data:`PAIRED_REFERENCE` per expert task (``tasks``: the report's scored tasks,
    ``task_rows``: their case indices) and on the mean over tasks; None when no task has the reference."""
    if not any(PAIRED_REFERENCE in t["systems"] for t in tasks.values()):
        return None
    stats: dict[tuple[str, str], np.ndarray] = {}
    kinds: dict[str, str] = {}
    for task, entry in tasks.items():
        if PAIRED_REFERENCE not in entry["systems"]:
            continue
        rows = task_rows[task]
        kinds[task] = kind = cases[rows[0]].kind
        references = [cases[i].reference for i in rows]
        labels = sorted({r.strip() for r in references}) if kind == "classification" else None
        extras = [cases[i].extra for i in rows]
        # systems with the same answers (oracle = moe when routing is right) are scored once
        seen: dict[tuple[str, ...], np.ndarray] = {}
        for system in entry["systems"]:
            answers = tuple(texts[plan.systems[system][i]] for i in rows)
            if answers not in seen:
                seen[answers] = row_stats(kind, answers, references, labels, extras)
            stats[(task, system)] = seen[answers]
    systems = sorted({s for _, s in stats if s != PAIRED_REFERENCE}, key=system_rank)
    return {
        "reference": PAIRED_REFERENCE,
        "resamples": RESAMPLES,
        "level": LEVEL,
        "systems": {
            system: paired_differences(
                {
                    task: (kinds[task], stats[(task, system)], stats[(task, PAIRED_REFERENCE)])
                    for task in kinds
                    if (task, system) in stats
                }
            )
            for system in systems
        },
    }
