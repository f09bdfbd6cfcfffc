"""What an arm is judged on: the latest outcome per request, grouped into analysis units.

A user is assigned once (sticky), so the unit of analysis is the user: each user's outcomes are
averaged into one sample. A request without a user id was assigned by a draw of its own and is
independent of every other request, so it counts as a unit of its own. Per request (``unit="request"``)
every request with an outcome is a sample; with users that send several requests that is
anti-conservative, and :func:`analysis_notes` says so in the report.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # the registry's views; any object with the same fields works
    from registry.views import OutcomeRecord, RequestRecord

__all__ = ["analysis_notes", "latest_outcomes", "unit_samples", "unit_values"]


def latest_outcomes(outcomes: Iterable[OutcomeRecord], metric: str) -> dict[str, tuple[datetime, float]]:
    """request_id → (time, value) of its latest outcome for ``metric`` (feedback may be corrected)."""
    latest: dict[str, tuple[datetime, float]] = {}
    for outcome in outcomes:
        raw = outcome.reward if metric == "reward" else outcome.thumbs
        if raw is None:
            continue
        value = float(raw)
        if metric == "reward" and not math.isfinite(value):
            continue
        seen = latest.get(outcome.request_id)
        if seen is None or outcome.created_at >= seen[0]:
            latest[outcome.request_id] = (outcome.created_at, value)
    return latest


def unit_samples(
    requests: list[RequestRecord], outcome_by_request: dict[str, tuple[datetime, float]], unit: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One entry per request with an outcome: (analysis-unit code, outcome time in seconds, value).

    Per user, a request without a user id is a unit of its own: it was assigned to its arm by a
    draw of its own, so it is independent of every other request.
    """
    codes: dict[str, int] = {}
    entries = []
    for request in requests:
        if request.request_id not in outcome_by_request:
            continue
        when, value = outcome_by_request[request.request_id]
        key = f"user:{request.user}" if unit == "user" and request.user else f"request:{request.request_id}"
        entries.append((codes.setdefault(key, len(codes)), when.timestamp(), value))
    if not entries:
        return np.empty(0, dtype=int), np.empty(0), np.empty(0)
    code, when, value = (np.asarray(column) for column in zip(*entries, strict=True))
    return code.astype(int), when.astype(float), value.astype(float)


def unit_values(samples: tuple[np.ndarray, np.ndarray, np.ndarray]) -> list[float]:
    """The samples an arm is judged on: each analysis unit's mean outcome (first-seen order)."""
    codes, _, values = samples
    if codes.size == 0:
        return []
    means = np.bincount(codes, values) / np.bincount(codes)
    return [float(x) for x in means]


def analysis_notes(
    requests: Sequence[RequestRecord],
    outcome_by_request: dict[str, tuple[datetime, float]],
    unit: str,
    verdict: str,
) -> list[str]:
    """The caveats of this analysis, in words, for the report."""
    notes = []
    rated = [r for r in requests if r.request_id in outcome_by_request]
    per_user: dict[str, int] = {}
    for request in rated:
        if request.user:
            per_user[request.user] = per_user.get(request.user, 0) + 1
    anonymous = sum(1 for request in rated if not request.user)
    repeat_outcomes = sum(count for count in per_user.values() if count > 1)
    if unit == "request" and repeat_outcomes:
        notes.append(
            f"Per-request analysis is anti-conservative: {repeat_outcomes} of {len(rated)} outcomes come "
            f"from users with several outcomes, and a user stays on one arm, so these are not independent "
            f"samples; p-values are too small and intervals too narrow. Use --unit user."
        )
    if unit == "user" and anonymous:
        notes.append(
            f"{anonymous} outcomes of requests without a user id count as one unit each "
            "(such requests are assigned independently)."
        )
    if unit == "request" and not per_user and rated:
        notes.append(
            "No request has a user id: every request is its own unit (each was assigned independently)."
        )
    if verdict == "fixed":
        notes.append(
            "Fixed-horizon verdict: its p-value holds for one look at a size planned in advance; checking "
            "the report repeatedly and stopping at the first p < alpha inflates false positives "
            "(the default --verdict sequential does not)."
        )
    return notes
