"""The Registry facade across operations: the state token and the Core read paths.

Real database: SQLite file; PostgreSQL too with MOEA_TEST_POSTGRES=1.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest
from helpers import make_request, make_run_dir

from registry.errors import NotFoundError
from registry.service import Registry
from registry.views import OutcomeRecord


def test_state_token_changes_only_on_serving_changes(registry: Registry, run_dir: Path) -> None:
    tokens = [registry.state_token()]
    registry.register_run(run_dir)
    tokens.append(registry.state_token())
    registry.promote("summarize@1", "prod")
    tokens.append(registry.state_token())
    assert len(set(tokens)) == 3
    registry.resolve("summarize")
    registry.log_requests([make_request("r0", None)])
    assert registry.state_token() == tokens[-1]


def test_core_read_paths_return_the_same_views_as_the_orm(registry: Registry, tmp_path: Path) -> None:
    """resolve / latest_router / experiment reads use Core statements; their views must equal the ORM-built ones."""
    for seed in range(4):
        registry.register_run(make_run_dir(tmp_path / f"run{seed}", seed=seed))
    registry.promote("summarize@2", "prod")
    registry.promote("summarize@2", "canary")
    registry.archive("summarize@4")
    orm = {v.version: v for v in registry.list_versions("summarize")}  # built from ORM rows
    for ref, version in [
        ("summarize", 2),
        ("summarize@prod", 2),
        ("summarize@canary", 2),
        ("summarize@latest", 3),
        ("summarize@1", 1),
        ("classify", 1),  # prod since its first registration
        ("classify@latest", 4),
    ]:
        name = ref.partition("@")[0]
        expected = orm[version] if name == "summarize" else registry.list_versions(name)[version - 1]
        assert registry.resolve(ref) == expected, ref
    assert registry.resolve("summarize@2").aliases == ["canary", "prod"]
    assert registry.resolve("summarize@4", include_archived=True) == orm[4]
    with pytest.raises(NotFoundError, match="archived"):
        registry.resolve("summarize@4")
    registry.remove_alias("summarize", "prod")  # `name` falls back to the newest live version
    assert registry.resolve("summarize").version == 3

    assert registry.latest_router() == registry.list_routers()[-1]
    assert registry.latest_router().experts == {"summarize": "summarize@4", "classify": "classify@4"}  # type: ignore[union-attr]

    experiment = registry.start_experiment("summarize", [(1, 1.0), (2, 1.0)])
    records = [make_request(f"r{i}", experiment.id, 1 + i % 2, shadow=i == 3) for i in range(5)]
    registry.log_requests(records)
    outcomes = [OutcomeRecord(f"r{i}", datetime.now(UTC), reward=i / 4, thumbs=i % 2 == 0) for i in range(5)]
    registry.record_outcomes(outcomes)
    assert registry.experiment_requests(experiment.id) == records
    assert registry.experiment_outcomes(experiment.id) == outcomes
    assert registry.experiment_requests(experiment.id + 1) == []
