"""Reads that must stay cheap as the registry grows (benchmarks/bench_registry_scale.py measures them at
10,000 versions): resolve finds its rows through indexes, and the gateway's one-read listing of every
version gives what the per-expert listing gives."""

from __future__ import annotations

import sqlite3

import pytest
from helpers import make_run_dir
from sqlalchemy.dialects import sqlite

from registry import catalog, versions
from registry.service import Registry

RESOLVE_STATEMENTS = {
    "name@N": versions.Q_VERSION_NUMBER,
    "name@alias": versions.Q_VERSION_ALIAS,
    "name@latest": versions.Q_VERSION_LATEST,
    "aliases of the version": catalog.Q_ALIASES_OF_VERSION,
}


@pytest.mark.parametrize("ref", ["summarize", "summarize@prod", "summarize@1", "summarize@latest"])
def test_resolve_answers_every_ref_kind(registry: Registry, run_dir, ref: str) -> None:  # type: ignore[no-untyped-def]
    registry.register_run(run_dir)
    view = registry.resolve(ref)
    assert (view.name, view.version, view.aliases) == ("summarize", 1, ["prod"])


@pytest.mark.parametrize("kind", sorted(RESOLVE_STATEMENTS))
def test_resolve_statements_search_indexes_instead_of_scanning(
    registry: Registry,
    run_dir,
    kind: str,  # type: ignore[no-untyped-def]
) -> None:
    if not registry.url.startswith("sqlite"):
        pytest.skip("EXPLAIN QUERY PLAN is SQLite's")
    registry.register_run(run_dir)
    compiled = RESOLVE_STATEMENTS[kind].compile(dialect=sqlite.dialect())
    params = {"name": "summarize", "version": 1, "alias": "prod", "expert_id": 1, "version_id": 1}
    values = [params.get(name, 1) if name != "archived_1" else 0 for name in compiled.positiontup]
    connection = sqlite3.connect(registry.url.removeprefix("sqlite:///"))
    try:
        plan = [row[3] for row in connection.execute(f"EXPLAIN QUERY PLAN {compiled}", values)]
    finally:
        connection.close()
    assert plan and not [step for step in plan if step.startswith("SCAN")], plan


def test_versions_by_expert_is_list_versions_of_every_expert(registry: Registry, tmp_path) -> None:  # type: ignore[no-untyped-def]
    for seed in range(3):
        registry.register_run(make_run_dir(tmp_path / f"run{seed}", seed=seed, router=False))
    registry.promote("summarize@2", "prod")
    registry.promote("summarize@3", "canary")
    registry.archive("classify@2")
    every = registry.versions_by_expert()
    assert sorted(every) == ["classify", "summarize"]
    for name, views in every.items():
        assert views == registry.list_versions(name)
    assert [v.aliases for v in every["summarize"]] == [[], ["prod"], ["canary"]]
    assert [v.archived for v in every["classify"]] == [False, True, False]
