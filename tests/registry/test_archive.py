"""Archive and restore (registry.archive).

Real database: SQLite file; PostgreSQL too with MOEA_TEST_POSTGRES=1.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import make_run_dir

from registry.errors import ConflictError, NotFoundError, ValidationError
from registry.service import Registry


def test_archive_requires_force_for_aliased_version(registry: Registry, tmp_path: Path) -> None:
    for seed in range(2):
        registry.register_run(make_run_dir(tmp_path / f"run{seed}", seed=seed))
    registry.promote("summarize@2", "prod")
    with pytest.raises(ConflictError, match="--force"):
        registry.archive("summarize@2")
    registry.archive("summarize@2", force=True)
    assert registry.get_version("summarize", 2).archived
    with pytest.raises(NotFoundError, match="archived"):
        registry.resolve("summarize@2")
    assert registry.resolve("summarize").version == 1  # alias gone → latest live
    assert registry.history("summarize")[-1].action == "remove"
    with pytest.raises(ConflictError, match="archived"):
        registry.promote("summarize@2", "prod")
    registry.restore("summarize@2")
    assert registry.resolve("summarize@latest").version == 2
    with pytest.raises(ValidationError):
        registry.archive("summarize")
