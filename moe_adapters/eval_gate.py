"""The eval gate of `moea registry promote NAME@V --alias A`: score V and the current holder of A on the
expert's registered eval and refuse when V is worse by more than a margin (README "Registry", "Eval gates").

What is measured, in order of preference:

1. *The golden set* (`moea registry attach-eval`, the newest one): each version's greedy answers from
   vLLM's offline engine, with its own system prompt applied by the gateway's rule, scored with the
   task kind's headline metric — `moea eval`'s own code (:func:`moe_adapters.eval_generate.generate`,
   :func:`moe_adapters.metrics.score_task`), so the gate measures what serving returns. Scores are cached
   in the registry per (version, golden set sha256): a second promote generates nothing. The first
   :data:`PROBE_ROWS` rows' answers are recorded with the score; the gateway checks them when it loads
   the version (serving/golden_check.py).
2. *No golden set*: the headline scores `moea register` recorded from the run's eval.json
   (``metrics.eval_score``, test split). The registry keeps neither a version's mixture nor its data
   (only the run dir's path and the mixture's hash), so the test split cannot be rebuilt from the
   registry; the recorded scores stand in for it, and the gate says so. Scores with different metrics
   are not compared.
3. Nothing to compare (no golden set, and V or the holder has no recorded score; or no holder): the
   promote is not gated, and the alias history reason says why.

`Registry.promote` (the library call) stays ungated; this module is what the command line calls.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from registry.errors import ConflictError
from registry.rundir import EVAL_SCORE_KEY
from registry.versions import DEFAULT_ALIAS

from .eval_types import EvalSettings

DEFAULT_MARGIN = 0.02
"""How far (absolute, on the headline metric) V may score below the current holder and still be promoted."""
PROBE_ROWS = 3
"""Golden rows whose greedy answers are recorded for the gateway's load check."""
TOLERANCE = 1e-9

Scorer = Callable[[list[Any], list[dict[str, Any]]], dict[str, dict[str, Any]]]
"""Scores versions on golden rows: (version views, rows) → {ref: {"metric", "score", "n", "answers"}}.
The real one is :func:`generate_and_score`; tests pass a fake."""


class GateRefused(ConflictError):
    """The candidate scored below the current holder by more than the margin (`--force` overrides)."""


@dataclass(frozen=True)
class GateScore:
    """One version's score as the gate saw it."""

    ref: str
    metric: str
    score: float
    n: int
    cached: bool = False


@dataclass(frozen=True)
class GateDecision:
    """What the gate measured and decided."""

    source: str
    """``golden set vN (sha…)``, ``recorded eval scores (test split, from register)`` or ``none``."""
    candidate: GateScore | None
    holder: GateScore | None
    margin: float
    passed: bool
    note: str
    """One line for the alias history and the terminal."""


def generate_and_score(
    views: list[Any], rows: list[dict[str, Any]], settings: EvalSettings | None = None
) -> dict[str, dict[str, Any]]:
    """Greedy answers of each version on the golden rows (vLLM offline engine, one child process for all
    versions) scored with the task kind's metrics; what `moea eval` does for a registered version."""
    from transformers import AutoTokenizer

    from .data_tokenize import render_prompt
    from .eval_generate import generate
    from .metrics import score_task
    from .prompting import version_prompt_spec

    settings = settings or EvalSettings()
    base = views[0].base_model
    tokenizer = AutoTokenizer.from_pretrained(base)
    prompts, names = [], []
    for view in views:
        spec = version_prompt_spec(view)
        for row in rows:
            text = render_prompt(tokenizer, row["messages"], spec)
            prompts.append(tokenizer(text, add_special_tokens=False)["input_ids"])
            names.append(view.ref)
    adapters = {view.ref: view.path for view in views}
    texts, _ = generate(base, adapters, prompts, names, settings)
    references = [row["reference"] for row in rows]
    extras = [row.get("extra") or {} for row in rows]
    results = {}
    for i, view in enumerate(views):
        answers = texts[i * len(rows) : (i + 1) * len(rows)]
        kind = view.task_kind
        labels = sorted({r.strip() for r in references}) if kind == "classification" else None
        metrics = score_task(kind, answers, references, labels, extras)
        results[view.ref] = {
            "metric": metrics["metric"],
            "score": metrics["score"],
            "n": len(rows),
            "answers": answers,
        }
    return results


@dataclass(frozen=True)
class _Scoring:
    """A version view plus its artifact folder (what :func:`generate_and_score` loads)."""

    view: Any
    path: str

    def __getattr__(self, name: str) -> Any:
        return getattr(self.view, name)


def golden_scores(
    registry: Any,
    views: list[Any],
    golden: Any,
    scorer: Scorer | None = None,
    settings: EvalSettings | None = None,
) -> dict[str, GateScore]:
    """Each version's score on `golden`, from the registry's cache or computed (all uncached versions in
    one generation) and cached, with the first rows' answers as probes for the gateway's load check."""
    settings = settings or EvalSettings()
    scores: dict[str, GateScore] = {}
    missing = []
    for view in views:
        cached = registry.eval_score(view.name, view.version, golden.sha256)
        if cached is not None:
            scores[view.ref] = GateScore(view.ref, cached.metric, cached.score, cached.n, cached=True)
        elif all(m.ref != view.ref for m in missing):
            missing.append(view)
    if missing:
        rows = registry.golden_rows(golden)
        if scorer is None:
            scoring = [_Scoring(v, str(registry.artifact_path(v))) for v in missing]
            results = generate_and_score(scoring, rows, settings)
        else:
            results = scorer(missing, rows)
        for view in missing:
            result = results[view.ref]
            probes = [
                {"messages": row["messages"], "answer": answer, "max_tokens": settings.max_new_tokens}
                for row, answer in zip(rows[:PROBE_ROWS], result.get("answers") or [], strict=False)
            ]
            record = {**result, "probes": probes, "settings": {"max_new_tokens": settings.max_new_tokens}}
            stored = registry.record_eval_score(view.name, view.version, golden.sha256, record)
            scores[view.ref] = GateScore(view.ref, stored.metric, stored.score, stored.n)
    return scores


def _recorded(view: Any) -> GateScore | None:
    score = (view.metrics or {}).get(EVAL_SCORE_KEY)
    if not isinstance(score, dict) or not isinstance(score.get("score"), int | float):
        return None
    return GateScore(view.ref, str(score.get("metric")), float(score["score"]), int(score.get("n") or 0))


def decide(candidate: GateScore | None, holder: GateScore | None, margin: float, source: str) -> GateDecision:
    """Pass unless both scores exist, on one metric, and the candidate is below the holder by more than
    `margin` (absolute). Missing or incomparable scores pass, not gated, and the note says why."""
    if candidate is None or holder is None:
        who = "the candidate" if candidate is None else "the current holder"
        return GateDecision(
            source, candidate, holder, margin, True, f"not gated: {who} has no eval score ({source})"
        )
    if candidate.metric != holder.metric:
        note = f"not gated: metrics differ ({candidate.ref} {candidate.metric}, {holder.ref} {holder.metric})"
        return GateDecision(source, candidate, holder, margin, True, note)
    delta = candidate.score - holder.score
    passed = delta >= -margin - TOLERANCE
    verdict = "passed" if passed else "failed"
    note = (
        f"eval gate {verdict} on {source}: {candidate.ref} {candidate.metric}={candidate.score:.4f} vs "
        f"{holder.ref} {holder.score:.4f} (delta {delta:+.4f}, margin {margin:g})"
    )
    return GateDecision(source, candidate, holder, margin, passed, note)


def evaluate_gate(
    registry: Any,
    ref: str,
    alias: str = DEFAULT_ALIAS,
    margin: float = DEFAULT_MARGIN,
    scorer: Scorer | None = None,
    settings: EvalSettings | None = None,
) -> GateDecision:
    """Score the version `ref` names against the current holder of `alias` (see the module docstring)."""
    if margin < 0:
        raise ValueError(f"--margin must be >= 0, got {margin}")
    candidate = registry.resolve(ref)
    try:
        holder = registry.resolve(f"{candidate.name}@{alias}")
    except LookupError:
        holder = None
    if holder is not None and holder.version == candidate.version:
        holder = None
    golden = registry.current_golden(candidate.name)
    views = [candidate] if holder is None else [candidate, holder]
    if golden is not None:
        source = f"golden set v{golden.version} ({golden.sha256[:12]}, {golden.rows} rows)"
        scores = golden_scores(registry, views, golden, scorer, settings)
        got = [scores[v.ref] for v in views]
    else:
        source = "recorded eval scores (test split, from `moea register`; no golden set attached)"
        got = [_recorded(v) for v in views]
    if holder is None:
        score = got[0]
        detail = f" ({score.metric}={score.score:.4f})" if score else ""
        return GateDecision(source, score, None, margin, True, f"not gated: no version holds {alias}{detail}")
    return decide(got[0], got[1], margin, source)


def gated_promote(
    registry: Any,
    ref: str,
    alias: str = DEFAULT_ALIAS,
    *,
    margin: float = DEFAULT_MARGIN,
    force: bool = False,
    reason: str = "",
    actor: str | None = None,
    scorer: Scorer | None = None,
    settings: EvalSettings | None = None,
) -> tuple[Any, GateDecision]:
    """Promote `ref` to `alias` if the eval gate passes (or `force`); the gate's note goes into the alias
    history reason. Raises :class:`GateRefused` (nothing moves) when it fails without `force`."""
    decision = evaluate_gate(registry, ref, alias, margin, scorer, settings)
    note = decision.note
    if not decision.passed:
        if not force:
            raise GateRefused(f"{note}; not promoted (use --force to promote anyway, or --margin)")
        note = f"forced past the eval gate: {note}"
    full_reason = f"{reason}; {note}" if reason else note
    view = registry.promote(ref, alias, actor=actor, reason=full_reason)
    return view, decision
