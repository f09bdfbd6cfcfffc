"""Reads that must stay cheap as the registry grows (benchmarks/bench_registry_scale.py measures them at
10,000 versions): resolve finds its rows through indexes, and the gateway's one-read listing of every
version gives what the per-expert listing gives."""

from __future__ import annotations

import sqlite3
from pathlib import Path

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


def test_served_experts_holds_what_names_resolve_to(registry: Registry, tmp_path: Path) -> None:
    for seed in range(5):
        registry.register_run(make_run_dir(tmp_path / f"run{seed}", seed=seed, router=False))
    registry.register_run(make_run_dir(tmp_path / "lone", tasks=("lone",), router=False))
    registry.promote("summarize@2", "prod")
    registry.promote("summarize@3", "canary")
    registry.archive("summarize@5")  # the newest live one is 4
    registry.archive("lone@1", force=True)  # nothing left to serve: prod went with it
    extra = {"classify": [2, 4, 99], "summarize": [5], "nobody": [1]}
    served = {expert.name: expert for expert in registry.served_experts(extra)}
    assert list(served) == ["classify", "lone", "summarize"]
    assert sorted(served["summarize"].versions) == [2, 3, 4, 5]  # prod, canary, latest, extra (archived)
    assert sorted(served["classify"].versions) == [1, 2, 4, 5]  # prod, extra, latest (99: no such version)
    lone = served["lone"]
    assert (lone.versions, lone.latest_version, lone.serving_version) == ({}, None, None)
    listed = {expert.name: expert for expert in registry.list_experts()}
    for name, expert in served.items():
        assert (expert.aliases, expert.latest_version) == (listed[name].aliases, listed[name].latest_version)
        if expert.serving_version is not None:
            assert registry.resolve(name).version == expert.serving_version
        for number, view in expert.versions.items():
            assert view == registry.resolve(f"{name}@{number}", include_archived=True)


def test_served_experts_builds_as_many_views_as_it_serves(
    registry: Registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    built: list[str] = []
    real = versions.ExpertVersionView
    monkeypatch.setattr(
        versions, "ExpertVersionView", lambda **fields: built.append(fields["name"]) or real(**fields)
    )
    counts = []
    for seeds in (range(2), range(2, 12)):
        for seed in seeds:
            registry.register_run(make_run_dir(tmp_path / f"run{seed}", seed=seed, router=False))
        built.clear()
        registry.served_experts()
        counts.append(sorted(built))
    assert counts == [["classify", "classify", "summarize", "summarize"]] * 2  # prod (1) and the latest


@pytest.mark.parametrize("kind", ["latest live", "alias holders", "numbered"])
def test_served_experts_statements_search_versions_instead_of_scanning(
    registry: Registry, run_dir: Path, kind: str
) -> None:
    if not registry.url.startswith("sqlite"):
        pytest.skip("EXPLAIN QUERY PLAN is SQLite's")
    registry.register_run(run_dir)
    statement = {
        "latest live": versions.Q_LATEST_LIVE_ROWS,
        "alias holders": versions.Q_ALIAS_HOLDER_ROWS,
        "numbered": versions.numbered_versions({"summarize": [1, 3], "classify": [2]}),
    }[kind]
    compiled = statement.compile(dialect=sqlite.dialect(), compile_kwargs={"literal_binds": True})
    connection = sqlite3.connect(registry.url.removeprefix("sqlite:///"))
    try:
        plan = [row[3] for row in connection.execute(f"EXPLAIN QUERY PLAN {compiled}")]
    finally:
        connection.close()
    # experts and aliases are read whole (a row each); versions only where they are searched for
    scans = [step for step in plan if step.startswith(("SCAN expert_versions", "SCAN live"))]
    assert plan and not scans, plan
    if kind == "numbered":  # by number too, not every version of the expert
        searches = [step for step in plan if step.startswith("SEARCH expert_versions USING INDEX")]
        assert searches and all("version=?" in step for step in searches), plan
