"""Resolving references and listing versions (registry.catalog / registry.versions).

Real database: SQLite file; PostgreSQL too with MOEA_TEST_POSTGRES=1.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import make_run_dir

from registry.errors import NotFoundError, ValidationError
from registry.service import Registry


@pytest.mark.parametrize(
    ("ref", "expected"),
    [
        ("summarize", 1),  # prod, set by the first registration (later ones leave it)
        ("summarize@latest", 3),
        ("summarize@1", 1),
        ("summarize@v1", 1),
        ("summarize@prod", 2),
        ("summarize@canary", 3),
    ],
)
def test_resolve_references(registry: Registry, tmp_path: Path, ref: str, expected: int) -> None:
    for seed in range(3):
        registry.register_run(make_run_dir(tmp_path / f"run{seed}", seed=seed))
    if ref != "summarize":
        registry.promote("summarize@2", "prod")
        registry.promote("summarize@3", "canary")
    else:
        registry.archive("summarize@3")
    assert registry.resolve(ref).version == expected


def test_resolve_name_prefers_prod_over_latest(registry: Registry, tmp_path: Path) -> None:
    for seed in range(2):
        registry.register_run(make_run_dir(tmp_path / f"run{seed}", seed=seed))
    view = registry.resolve("summarize")
    assert (view.version, view.aliases) == (1, ["prod"])
    assert registry.resolve("summarize@latest").version == 2
    registry.remove_alias("summarize", "prod")  # without prod: the latest live version
    assert registry.resolve("summarize").version == 2
    registry.promote("summarize@1", "prod")
    view = registry.resolve("summarize")
    assert (view.version, view.aliases) == (1, ["prod"])


@pytest.mark.parametrize(
    ("ref", "error"),
    [
        ("nosuch", NotFoundError),
        ("summarize@9", NotFoundError),
        ("summarize@staging", NotFoundError),
        ("summarize@0", ValidationError),
        ("summarize@" + "9" * 20, ValidationError),  # beyond the version column (SQLite: OverflowError)
        ("../etc/passwd", ValidationError),
        ("a/b", ValidationError),
        ("x" * 65, ValidationError),
        ("", ValidationError),
        ("summarize@Prod!", ValidationError),
    ],
)
def test_resolve_errors_are_one_line_and_typed(
    registry: Registry, run_dir: Path, ref: str, error: type
) -> None:
    registry.register_run(run_dir)
    with pytest.raises(error) as caught:
        registry.resolve(ref)
    assert "\n" not in str(caught.value)
