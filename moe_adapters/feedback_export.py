"""Preference pairs from live traffic (`moea feedback export`): rated answers that `moea serve --log-content`
logged, paired per prompt, written with :func:`moe_adapters.preferences.write_preferences` for the DPO step.

Pairing rules, for the rated answers of one expert (all its versions, or one experiment's arms):

* Answers pair up when their client messages are the same (the same prompt answered by two arms, or twice
  by one version) and their texts differ. Every such pair with a clear preference is written once (a pair
  with the same chosen and rejected texts as one already written is skipped as a duplicate).
* Preference: thumbs up over thumbs down; for rewards the higher one, when the difference is at least
  ``min_gap`` (and not zero). Two ups, two downs or a gap below ``min_gap`` are a tie; a thumbs rating and a
  reward cannot be compared.
* At most ``max_pairs_per_prompt`` pairs per prompt (0: no cap), so that a prompt answered many times does
  not outweigh the rest (n answers can make n²/4 pairs): the pairs with the largest reward gap are kept,
  then the earliest.
* An answer in no written pair is dropped and counted under one reason (:data:`DROP_REASONS`): its content
  was not logged (served without ``--log-content``, or purged), its prompt is not a text chat ending in a
  user turn (e.g. a /v1/completions prompt), its answer is empty, nobody else answered its prompt, the
  others gave the same text, or its comparisons were ties / not comparable / duplicates.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from registry.errors import ValidationError
from registry.views import LoggedAnswer

from .data_rows import CHAT_ROLES
from .preferences import PreferencePair, pair_from_record, write_preferences

NO_CONTENT = "no content logged"
NOT_CHAT = "prompt is not a text chat ending in a user message"
EMPTY_ANSWER = "empty answer"
NO_PAIR = "no other answer to the same prompt"
SAME_ANSWER = "other answers to the prompt are the same text"
TIE = "tie or reward gap below --min-gap"
NOT_COMPARABLE = "ratings not comparable (thumbs vs reward)"
DUPLICATE = "only in pairs already written (same texts)"
CAPPED = "only in pairs over --max-pairs-per-prompt"
DROP_REASONS = (
    NO_CONTENT, NOT_CHAT, EMPTY_ANSWER, NO_PAIR, SAME_ANSWER, TIE, NOT_COMPARABLE, DUPLICATE, CAPPED
)  # fmt: skip
"""Why a rated answer is in no pair, in the order reports list them."""
# When an answer's comparisons failed for several reasons, the one nearest to a pair is reported.
_NEAREST_FIRST = (CAPPED, DUPLICATE, TIE, NOT_COMPARABLE, SAME_ANSWER)


@dataclass
class PairingResult:
    """The pairs built from a set of rated answers, and what happened to the answers."""

    pairs: list[PreferencePair]
    rated: int
    """Rated answers considered."""
    used: int
    """Answers that are in at least one written pair."""
    dropped: Counter[str] = field(default_factory=Counter)
    """Reason (one of :data:`DROP_REASONS`) → answers dropped for it."""


@dataclass
class ExportReport(PairingResult):
    """A :class:`PairingResult` written to a file."""

    path: Path | None = None
    """The file written (None when there was no pair: nothing is written then)."""
    sha256: str | None = None


def preference(a: LoggedAnswer, b: LoggedAnswer, min_gap: float) -> tuple[int, float | None] | str:
    """Which of two rated answers is preferred: ``(1, gap)`` for `a`, ``(-1, gap)`` for `b` (gap: the
    reward difference, None for thumbs), else the reason there is none (:data:`TIE`, :data:`NOT_COMPARABLE`)."""
    if a.thumbs is not None and b.thumbs is not None:
        return TIE if a.thumbs == b.thumbs else ((1 if a.thumbs else -1), None)
    if a.reward is not None and b.reward is not None:
        gap = a.reward - b.reward
        if gap == 0 or abs(gap) < min_gap:
            return TIE
        return (1 if gap > 0 else -1), abs(gap)
    return NOT_COMPARABLE


def chat_messages(value: Any) -> tuple[tuple[str, str], ...] | None:
    """The logged messages as ``(role, content)`` pairs when they are a text chat ending in a non-empty user
    message (what a preference pair's prompt must be), else None."""
    if not isinstance(value, list) or not value:
        return None
    messages: list[tuple[str, str]] = []
    for message in value:
        if not isinstance(message, dict):
            return None
        role, content = message.get("role"), message.get("content")
        if role not in CHAT_ROLES or not isinstance(content, str):
            return None
        messages.append((role, content))
    if messages[-1][0] != "user" or not messages[-1][1].strip():
        return None
    return tuple(messages)


def _pair(chosen: LoggedAnswer, rejected: LoggedAnswer, messages: Any, gap: float | None) -> PreferencePair:
    meta: dict[str, Any] = {
        "expert": chosen.expert,
        "versions": [chosen.version, rejected.version],
        "request_ids": [chosen.request_id, rejected.request_id],
        "experiment_id": chosen.experiment_id if chosen.experiment_id == rejected.experiment_id else None,
        "preferred_by": "thumbs" if gap is None else "reward",
    }
    if gap is not None:
        meta["reward_gap"] = gap
    return PreferencePair(messages, chosen.answer or "", rejected.answer or "", meta)


def pair_answers(
    answers: list[LoggedAnswer], min_gap: float = 0.5, max_pairs_per_prompt: int = 0
) -> PairingResult:
    """Preference pairs from rated answers (rules in the module docstring), in the answers' order."""
    if min_gap < 0:
        raise ValueError(f"min_gap must be >= 0, got {min_gap}")
    if max_pairs_per_prompt < 0:
        raise ValueError(f"max_pairs_per_prompt must be >= 0 (0: no cap), got {max_pairs_per_prompt}")
    result = PairingResult(pairs=[], rated=len(answers), used=0)
    groups: dict[str, list[tuple[LoggedAnswer, tuple[tuple[str, str], ...]]]] = {}
    for answer in answers:
        if not answer.has_content:
            result.dropped[NO_CONTENT] += 1
        elif (messages := chat_messages(answer.messages)) is None:
            result.dropped[NOT_CHAT] += 1
        elif not (answer.answer or "").strip():
            result.dropped[EMPTY_ANSWER] += 1
        else:
            groups.setdefault(json.dumps(messages), []).append((answer, messages))
    for group in groups.values():
        _pair_group(group, min_gap, max_pairs_per_prompt, result)
    return result


def _pair_group(
    group: list[tuple[LoggedAnswer, tuple[tuple[str, str], ...]]],
    min_gap: float,
    cap: int,
    result: PairingResult,
) -> None:
    """Pair the answers to one prompt into `result` (at most `cap` pairs, 0: all); count the answers left out."""
    if len(group) == 1:
        result.dropped[NO_PAIR] += 1
        return
    candidates: list[tuple[PreferencePair, int, int]] = []
    seen: set[tuple[str, str]] = set()
    misses: list[set[str]] = [set() for _ in group]
    for i, (a, messages) in enumerate(group):
        for j in range(i + 1, len(group)):
            b = group[j][0]
            verdict = SAME_ANSWER if a.answer == b.answer else preference(a, b, min_gap)
            if isinstance(verdict, str):
                misses[i].add(verdict)
                misses[j].add(verdict)
                continue
            winner, gap = verdict
            chosen, rejected = (a, b) if winner > 0 else (b, a)
            texts = (chosen.answer or "", rejected.answer or "")
            if texts in seen:
                misses[i].add(DUPLICATE)
                misses[j].add(DUPLICATE)
                continue
            pair = _pair(chosen, rejected, messages, gap)
            problems: list[str] = []  # the reader's own check: every pair written is one it accepts
            if pair_from_record(pair.to_record(), "export", problems) is None:
                raise AssertionError(f"built an invalid preference pair: {problems}")
            seen.add(texts)
            candidates.append((pair, i, j))
    if cap and len(candidates) > cap:
        order = sorted(
            range(len(candidates)), key=lambda k: -(candidates[k][0].meta.get("reward_gap") or 0.0)
        )
        kept = set(order[:cap])  # largest gap first; sorted() is stable, so ties keep the earliest
        for _, i, j in candidates:
            misses[i].add(CAPPED)
            misses[j].add(CAPPED)
        candidates = [c for k, c in enumerate(candidates) if k in kept]
    used: set[int] = set()
    for pair, i, j in candidates:
        result.pairs.append(pair)
        used.update((i, j))
    result.used += len(used)
    for index, reasons in enumerate(misses):
        if index not in used:
            result.dropped[next(reason for reason in _NEAREST_FIRST if reason in reasons)] += 1


def export_preferences(
    registry: Any,
    name: str,
    out: Path | str,
    *,
    experiment_id: int | None = None,
    min_gap: float = 0.5,
    max_pairs_per_prompt: int = 0,
) -> ExportReport:
    """Pair the rated answers of expert `name` (all versions, or the arms of experiment `experiment_id`) and
    write the pairs to `out` (JSONL, atomically) when there is at least one; `registry` is a
    :class:`registry.service.Registry`. Raises the registry's NotFoundError for an unknown expert or experiment,
    ValidationError for an experiment of another expert."""
    if experiment_id is not None:
        experiment = registry.get_experiment(experiment_id)
        if experiment.expert != name:
            raise ValidationError(
                f"experiment {experiment_id} is an experiment of {experiment.expert}, not of {name}"
            )
    else:
        registry.list_versions(name)  # an unknown expert fails here, with the registry's message
    paired = pair_answers(registry.logged_answers(name, experiment_id), min_gap, max_pairs_per_prompt)
    report = ExportReport(paired.pairs, paired.rated, paired.used, paired.dropped)
    if paired.pairs:
        report.path = Path(out)
        report.sha256 = write_preferences(report.path, paired.pairs)
    return report
