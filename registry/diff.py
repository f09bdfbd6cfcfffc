"""Differences between two expert versions: metrics, config and file hashes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import Engine
from sqlmodel import Session

from .artifacts import ArtifactTrees
from .models import parse_ref
from .versions import find_version, view_for
from .views import ExpertVersionView


@dataclass(frozen=True)
class VersionDiff:
    """Differences between two versions: `(key, a, b)` rows for metrics, config and files."""

    a: ExpertVersionView
    b: ExpertVersionView
    metrics: list[tuple[str, Any, Any]]
    config: list[tuple[str, Any, Any]]
    files: list[tuple[str, str | None, str | None]]


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        flat: dict[str, Any] = {}
        for key, item in value.items():
            flat.update(_flatten(item, f"{prefix}.{key}" if prefix else str(key)))
        return flat
    return {prefix: value}


def _changed(a: dict[str, Any], b: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    flat_a, flat_b = _flatten(a), _flatten(b)
    return [
        (k, flat_a.get(k), flat_b.get(k))
        for k in sorted(flat_a.keys() | flat_b.keys())
        if flat_a.get(k) != flat_b.get(k)
    ]


def diff(engine: Engine, trees: ArtifactTrees, ref_a: str, ref_b: str) -> VersionDiff:
    """Metrics, config and file-hash differences between two versions (any experts)."""
    views = []
    for ref in (ref_a, ref_b):
        with Session(engine) as session:
            row = find_version(session, parse_ref(ref), ref)
            views.append(view_for(session, row, trees.get(session, row.sha256)))
    a, b = views
    files_a = {f.relpath: f.sha256 for f in a.files}
    files_b = {f.relpath: f.sha256 for f in b.files}
    files = [
        (p, files_a.get(p), files_b.get(p))
        for p in sorted(files_a.keys() | files_b.keys())
        if files_a.get(p) != files_b.get(p)
    ]
    return VersionDiff(
        a=a, b=b, metrics=_changed(a.metrics, b.metrics), config=_changed(a.config, b.config), files=files
    )
