"""Schema migrations: one head, models == migrations, and the foundation database upgrades in place."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from helpers import make_run_dir
from sqlalchemy import text
from sqlmodel import SQLModel

from registry import db
from registry.service import Registry

FOUNDATION_DB = Path(__file__).resolve().parent / "fixtures" / "foundation.db"


def test_single_migration_head() -> None:
    assert len(db.head_revisions()) == 1, f"merge the alembic heads {db.head_revisions()}"


def test_migrations_produce_exactly_the_models(db_url: str) -> None:
    engine = db.open_engine(db_url)
    with engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        assert compare_metadata(context, SQLModel.metadata) == []


def test_foundation_database_upgrades_in_place_with_data_intact(tmp_path: Path) -> None:
    path = tmp_path / "registry.db"
    shutil.copy(FOUNDATION_DB, path)
    url = f"sqlite:///{path}"
    assert db.current_revision(db.open_engine(url, upgrade=False)) == "0001_foundation"

    registry = Registry(url, tmp_path / "store")  # upgrades on open
    assert db.current_revision(registry.engine) == db.head_revisions()[0]
    assert [e.name for e in registry.list_experts()] == ["classify", "summarize"]
    old = registry.list_versions("summarize")
    assert [(v.version, v.archived, v.created_by) for v in old] == [
        (1, False, "founder@host"),
        (2, False, "founder@host"),
    ]
    # 0008: the foundation era recorded the previous version as "parent"; trained from the base, it has none.
    assert old[1].metrics == {"best_val_loss": 1.3} and old[1].parent_version is None
    assert registry.get_version("summarize", 1).files[0].relpath == "adapter_config.json"
    assert registry.latest_router().experts == {"summarize": "summarize@2"}  # type: ignore[union-attr]
    assert registry.resolve("summarize").version == 2

    assert registry.resolve("classify").version == 2  # no prod (registered before prod was set): latest

    # New features work on the upgraded data, and new versions continue the numbering.
    registry.promote("summarize@1", "prod")
    assert registry.resolve("summarize").version == 1
    created = registry.register_run(make_run_dir(tmp_path / "run")).experts
    assert [v.ref for v in created] == ["classify@3", "summarize@3"]
    # Registering did not move traffic: classify's prod was pinned to the version it served (2).
    assert registry.resolve("classify").version == 2 and registry.resolve("summarize").version == 1
    assert [(e.action, e.to_version) for e in registry.history("classify")] == [("register", 2)]
    with registry.engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM expert_versions")).scalar() == 6


def test_downgrade_to_foundation_and_back(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'registry.db'}"
    registry = Registry(url, tmp_path / "store")
    registry.register_run(make_run_dir(tmp_path / "run"))
    from alembic import command

    config = db._alembic_config()
    with registry.engine.connect() as connection, connection.begin():
        config.attributes["connection"] = connection
        command.downgrade(config, "0001_foundation")
        config.attributes.pop("connection")
    assert db.current_revision(registry.engine) == "0001_foundation"
    registry = Registry(url, tmp_path / "store")
    assert registry.resolve("summarize@1").sha256


def test_0008_keeps_a_lineage_parent_and_clears_a_predecessor_number(tmp_path: Path) -> None:
    """Rows as 0007 wrote them: a plain v2 with parent 1 (its predecessor), a DPO v3 with parent 1 and its
    lineage record. After 0008 only the lineage remains a parent."""
    from alembic import command

    url = f"sqlite:///{tmp_path / 'registry.db'}"
    registry = Registry(url, tmp_path / "store")
    for seed in (1, 2, 3):
        registry.register_run(make_run_dir(tmp_path / f"run{seed}", ("summarize",), router=False, seed=seed))
    config = db._alembic_config()
    with registry.engine.connect() as connection, connection.begin():
        config.attributes["connection"] = connection
        command.downgrade(config, "0007_loop")
        connection.execute(text("UPDATE expert_versions SET parent_version = version - 1 WHERE version > 1"))
        connection.execute(
            text("UPDATE expert_versions SET config = :c, parent_version = 1 WHERE version = 3"),
            {"c": json.dumps({"lineage": {"method": "dpo", "parent": "summarize@1", "parent_version": 1}})},
        )
        command.upgrade(config, "head")
        config.attributes.pop("connection")
    parents = {
        v.version: v.parent_version for v in Registry(url, tmp_path / "store").list_versions("summarize")
    }
    assert parents == {1: None, 2: None, 3: 1}
