"""Aliases and their history (registry.aliases).

Real database: SQLite file; PostgreSQL too with MOEA_TEST_POSTGRES=1.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import make_run_dir

from registry.errors import ConflictError
from registry.service import Registry


def test_promote_rollback_history(registry: Registry, tmp_path: Path) -> None:
    for seed in range(3):
        registry.register_run(make_run_dir(tmp_path / f"run{seed}", seed=seed))
    registry.promote("summarize@1", "prod", actor="alice", reason="first")  # holds it already: no event
    registry.promote("summarize@2", "prod", actor="bob")
    registry.promote("summarize@3", "prod", actor="carol")
    assert registry.rollback("summarize", "prod").version == 2
    assert registry.rollback("summarize", "prod").version == 1
    with pytest.raises(ConflictError, match="no previous holder"):
        registry.rollback("summarize", "prod")
    assert registry.resolve("summarize@prod").version == 1
    history = registry.history("summarize")
    assert [(e.action, e.from_version, e.to_version) for e in history] == [
        ("register", None, 1),  # the first registration set prod
        ("promote", 1, 2),
        ("promote", 2, 3),
        ("rollback", 3, 2),
        ("rollback", 2, 1),
    ]
    assert history[0].reason == "first registration" and history[1].actor == "bob"
    # Only one version ever holds an alias.
    assert [v.version for v in registry.list_versions("summarize") if "prod" in v.aliases] == [1]
