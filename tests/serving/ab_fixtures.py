"""Shared helpers of the A/B tests: an experiment view and a synthetic request/outcome log."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import numpy as np

from registry.views import Arm, ExperimentView, OutcomeRecord, RequestRecord
from serving.ab.assign import assign_arm

T0 = datetime(2025, 1, 1, tzinfo=UTC)


def experiment(
    arms: list[tuple[int, float]],
    metric: str = "reward",
    salt: str = "salt-1",
    shadow: int | None = None,
    expert: str = "summarize",
) -> ExperimentView:
    """A running experiment view on `expert` with the given (version, weight) arms."""
    return ExperimentView(
        id=7,
        expert=expert,
        arms=[Arm(v, w) for v, w in arms],
        metric=metric,
        salt=salt,
        status="running",
        shadow_version=shadow,
        started_at=T0,
        stopped_at=None,
        winner=None,
    )


def synthetic_log(
    exp: ExperimentView,
    n_users: int,
    reward_by_version: dict[int, float],
    *,
    seed: int = 0,
    outcome_share: float = 1.0,
    requests_per_user: int = 2,
    skew_drop: tuple[int, float] | None = None,
) -> tuple[list[RequestRecord], list[OutcomeRecord]]:
    """Users assigned by assign_arm; rewards ~ N(mean of their version, 0.2); thumbs = reward > 0.5."""
    rng = np.random.default_rng(seed)
    requests, outcomes = [], []
    for user_index in range(n_users):
        user = f"user-{user_index}"
        version = assign_arm(exp, user)
        if skew_drop and version == skew_drop[0] and rng.random() < skew_drop[1]:
            continue  # this arm loses users (a logging bug): the split no longer matches
        for turn in range(requests_per_user):
            request_id = f"chatcmpl-{user_index}-{turn}"
            requests.append(
                RequestRecord(
                    request_id=request_id,
                    created_at=T0,
                    expert=exp.expert,
                    version=version,
                    experiment_id=exp.id,
                    user=user,
                    routed=False,
                    latency_ms=float(100 + 10 * version + rng.normal(0, 5)),
                    prompt_tokens=20,
                    completion_tokens=30 + version,
                    status_code=200,
                )
            )
            if rng.random() < outcome_share:
                reward = float(rng.normal(reward_by_version[version], 0.2))
                outcomes.append(
                    OutcomeRecord(request_id, T0 + timedelta(seconds=1), reward=reward, thumbs=reward > 0.5)
                )
    return requests, outcomes
