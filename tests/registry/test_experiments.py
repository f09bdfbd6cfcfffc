"""A/B experiments with their request log and outcomes (registry.experiments, registry.request_log).

Real database: SQLite file; PostgreSQL too with MOEA_TEST_POSTGRES=1.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest
from helpers import make_request, make_run_dir

from registry.errors import ConflictError, NotFoundError, ValidationError
from registry.service import Registry
from registry.views import OutcomeRecord


def test_experiments_requests_and_outcomes(registry: Registry, tmp_path: Path) -> None:
    for seed in range(3):
        registry.register_run(make_run_dir(tmp_path / f"run{seed}", seed=seed))
    experiment = registry.start_experiment(
        "summarize", [(1, 0.5), (2, 0.5)], metric="thumbs", shadow_version=3
    )
    assert (experiment.status, [a.version for a in experiment.arms], experiment.shadow_version) == (
        "running",
        [1, 2],
        3,
    )
    assert registry.active_experiment("summarize") == experiment
    assert registry.active_experiments() == [experiment]
    with pytest.raises(ConflictError, match="already running"):
        registry.start_experiment("summarize", [(1, 1.0)])
    with pytest.raises(ConflictError, match="running experiment"):
        registry.archive("summarize@2")

    registry.log_requests(
        [
            make_request("a", experiment.id, 1),
            make_request("b", experiment.id, 2),
            make_request("b", experiment.id, 3, shadow=True),
            make_request("c", None),
        ]
    )
    registry.record_outcomes(
        [
            OutcomeRecord("a", datetime.now(UTC), thumbs=True),
            OutcomeRecord("b", datetime.now(UTC), reward=0.25),
            OutcomeRecord("c", datetime.now(UTC), thumbs=False),
        ]
    )
    requests = registry.experiment_requests(experiment.id)
    assert [(r.request_id, r.version, r.shadow) for r in requests] == [
        ("a", 1, False),
        ("b", 2, False),
        ("b", 3, True),
    ]
    assert requests[0].latency_ms == 12.5 and requests[0].created_at.tzinfo is not None
    outcomes = registry.experiment_outcomes(experiment.id)
    assert [(o.request_id, o.thumbs, o.reward) for o in outcomes] == [("a", True, None), ("b", None, 0.25)]

    stopped = registry.stop_experiment("summarize", winner=2)
    assert (stopped.status, stopped.winner) == ("stopped", 2) and stopped.stopped_at is not None
    assert registry.resolve("summarize@prod").version == 2
    assert registry.history("summarize")[-1].reason == f"experiment {experiment.id} winner"
    assert registry.active_experiment("summarize") is None
    assert registry.get_experiment("summarize") == stopped == registry.get_experiment(experiment.id)
    assert registry.list_experiments("summarize") == [stopped]


@pytest.mark.parametrize(
    ("arms", "kwargs", "error"),
    [
        ([], {}, ValidationError),
        ([(1, 0.0)], {}, ValidationError),
        ([(1, 1.0), (1, 1.0)], {}, ValidationError),
        ([(1, 1.0)], {"metric": "clicks"}, ValidationError),
        ([(1, 1.0)], {"shadow_version": 1}, ValidationError),
        ([(9, 1.0)], {}, NotFoundError),
    ],
)
def test_experiment_validation(registry: Registry, run_dir: Path, arms, kwargs, error: type) -> None:
    registry.register_run(run_dir)
    with pytest.raises(error):
        registry.start_experiment("summarize", arms, **kwargs)
    assert registry.active_experiments() == []
