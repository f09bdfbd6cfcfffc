"""Lineage of a version trained from another one (``moea train --dpo PREFS --from NAME@prod``).

The run dir's ``run.json`` holds ``lineage: {NAME: {method, parent, parent_version, preferences_sha256,
...}}``; ``moea register`` checks it, sets the new version's ``parent_version`` to the recorded parent
(instead of the previous version number) and keeps the whole record in the version's ``config`` JSON
under :data:`LINEAGE_KEY`. ``moea registry show`` / ``history`` print it with :func:`lineage_line`.
"""

from __future__ import annotations

import re
from typing import Any

from .errors import ValidationError

LINEAGE_KEY = "lineage"
"""Key of the lineage record in ``run.json`` (per expert) and in a version's ``config``."""
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")


def read_lineage(raw: Any, name: str, where: str) -> dict[str, Any] | None:
    """Expert ``name``'s lineage record from ``run.json``'s ``lineage`` mapping (None: not derived from a
    registered version); raises ValidationError naming ``where`` for a malformed record."""
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise ValidationError(f"{where}: 'lineage' must be a mapping of expert name to its lineage record")
    record = raw.get(name)
    if record is None:
        return None
    parent = record.get("parent_version") if isinstance(record, dict) else None
    if not isinstance(parent, int) or isinstance(parent, bool) or parent < 1:
        raise ValidationError(f"{where}: lineage.{name}.parent_version must be a version number (>= 1)")
    sha = record.get("preferences_sha256")
    if sha is not None and (not isinstance(sha, str) or not _SHA256_RE.match(sha)):
        raise ValidationError(f"{where}: lineage.{name}.preferences_sha256 must be a sha256 hex digest")
    return dict(record)


def version_lineage(view: Any) -> dict[str, Any] | None:
    """The lineage record stored with a version (None for a plainly trained one)."""
    record = (getattr(view, "config", None) or {}).get(LINEAGE_KEY)
    return record if isinstance(record, dict) else None


def parent_label(view: Any) -> str:
    """The ``parent`` cell of ``moea registry show``: ``3``, ``3 (dpo)`` or ``-``."""
    record = version_lineage(view)
    if record is not None:
        return f"{record.get('parent_version')} ({record.get('method') or 'derived'})"
    return str(view.parent_version or "-")


def lineage_line(view: Any) -> str | None:
    """One line on how a derived version was made, e.g. ``sentiment@4 ← sentiment@3 (from sentiment@prod)
    by dpo on prefs.jsonl (120 pairs, sha256 3f2a…)``; None for a plainly trained version."""
    record = version_lineage(view)
    if record is None:
        return None
    method = record.get("method") or "derived"
    parent = f"{view.name}@{record.get('parent_version')}"
    asked = record.get("parent")
    origin = f" (from {asked})" if asked and asked != parent else ""
    data = ""
    if record.get("preferences_sha256"):
        file = str(record.get("preferences_file") or "").rsplit("/", 1)[-1] or "preferences"
        pairs = f"{record['pairs']} pairs, " if isinstance(record.get("pairs"), int) else ""
        data = f" on {file} ({pairs}sha256 {record['preferences_sha256'][:12]}…)"
    return f"{view.ref} ← {parent}{origin} by {method}{data}"
