"""Read operations on experts and versions: resolve a reference, list experts, list and show versions."""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any, cast

from sqlalchemy import Engine, Row, Table, bindparam, func
from sqlalchemy import select as sa_select
from sqlmodel import Session, col, select

from .artifacts import ArtifactTrees
from .errors import NotFoundError
from .models import Alias, Expert, ExpertVersion, Ref, as_utc, parse_ref, validate_name
from .versions import (
    DEFAULT_ALIAS,
    Q_ALIAS_HOLDER_ROWS,
    Q_ALL_ALIASES,
    Q_ALL_VERSIONS,
    Q_LATEST_LIVE_ROWS,
    aliases_by_version,
    find_expert,
    find_version,
    find_version_row,
    make_version_view,
    numbered_versions,
    version_view,
    view_for,
)
from .views import ExpertVersionView, ExpertView, ServedExpertView

_ALIASES = cast(Table, Alias.__table__)
# Built once: resolve is on the gateway's hot path (see registry.versions).
Q_ALIASES_OF_VERSION = (
    sa_select(_ALIASES.c.alias)
    # expert_id first: SQLite then searches UNIQUE(expert_id, alias) instead of scanning every alias
    .where(_ALIASES.c.expert_id == bindparam("expert_id"), _ALIASES.c.version_id == bindparam("version_id"))
    .order_by(_ALIASES.c.alias)
)


def resolve(engine: Engine, ref: str, include_archived: bool = False) -> ExpertVersionView:
    """`name` (→ alias prod if set, else latest), `name@latest`, `name@<alias>`, `name@3` → a version."""
    parsed = parse_ref(ref)
    with engine.connect() as connection:  # one read transaction: a consistent snapshot
        row = find_version_row(connection, parsed, ref)
        if row.archived and not include_archived:
            raise NotFoundError(
                f"{parsed.name}@{row.version} is archived; restore it with `moea registry restore "
                f"{parsed.name}@{row.version}` or pick another version"
            )
        aliases = list(
            connection.execute(
                Q_ALIASES_OF_VERSION, {"expert_id": row.expert_id, "version_id": row.id}
            ).scalars()
        )
    return make_version_view(row.expert_name, row.expert_task_kind, row, aliases)


def get_version(engine: Engine, trees: ArtifactTrees, name: str, version: int) -> ExpertVersionView:
    """One version (archived or not) with its file list."""
    with Session(engine) as session:
        row = find_version(session, Ref(validate_name(name), version=version), f"{name}@{version}")
        return view_for(session, row, trees.get(session, row.sha256))


def list_experts(engine: Engine) -> list[ExpertView]:
    """Every expert with its latest live version and aliases."""
    with Session(engine) as session:
        stats = {
            expert_id: (latest, count)
            for expert_id, latest, count in session.exec(
                sa_select(ExpertVersion.expert_id, func.max(ExpertVersion.version), func.count())
                .where(col(ExpertVersion.archived).is_(False))
                .group_by(ExpertVersion.expert_id)
            ).all()
        }
        aliases: dict[int, dict[str, int]] = {}
        for expert_id, alias, version in session.exec(
            sa_select(Alias.expert_id, Alias.alias, ExpertVersion.version).join(
                ExpertVersion, col(ExpertVersion.id) == col(Alias.version_id)
            )
        ).all():
            aliases.setdefault(expert_id, {})[alias] = version
        return [
            ExpertView(
                name=e.name,
                description=e.description,
                task_kind=e.task_kind,
                base_model=e.base_model,
                base_model_sha256=e.base_model_sha256,
                created_at=as_utc(e.created_at),
                latest_version=stats.get(e.id, (None, 0))[0],
                version_count=stats.get(e.id, (None, 0))[1],
                aliases=dict(sorted(aliases.get(e.id, {}).items())),
            )
            for e in session.exec(select(Expert).order_by(Expert.name)).all()
        ]


NUMBERED_PER_STATEMENT = 100
"""Experts per statement when `served_experts` reads extra versions (bound parameters stay in the hundreds)."""


def served_experts(
    engine: Engine, extra: Mapping[str, Collection[int]] | None = None
) -> list[ServedExpertView]:
    """Every expert (by name) with its aliases and the versions its name resolves to without a number:
    each alias's holder and the newest live version, plus those of `extra` (expert name → version
    numbers: experiment arms and shadows) that exist, archived ones included.

    What the gateway reads after every registry change. One read transaction of two Core statements
    (and one per `NUMBERED_PER_STATEMENT` experts in `extra`) that search the versions instead of
    reading them all, so its cost grows with the experts, aliases and `extra`, not with the versions
    registered (benchmarks/bench_registry_scale.py). `serving_version` is what `resolve(name)` answers.
    """
    wanted = sorted((name, numbers) for name, numbers in (extra or {}).items() if numbers)
    with engine.connect() as connection:
        heads = connection.execute(Q_LATEST_LIVE_ROWS).all()
        holders = connection.execute(Q_ALIAS_HOLDER_ROWS).all()
        numbered = [
            row
            for start in range(0, len(wanted), NUMBERED_PER_STATEMENT)
            for row in connection.execute(
                numbered_versions(dict(wanted[start : start + NUMBERED_PER_STATEMENT]))
            )
        ]
    rows: dict[int, Row[Any]] = {row.id: row for row in [*heads, *holders, *numbered] if row.id is not None}
    aliases: dict[str, dict[str, int]] = {}
    aliases_of: dict[int, list[str]] = {}  # version id → its aliases, sorted (the holders' order)
    for row in holders:
        aliases.setdefault(row.expert_name, {})[row.alias] = row.version
        aliases_of.setdefault(row.id, []).append(row.alias)
    views: dict[str, dict[int, ExpertVersionView]] = {}
    for row in sorted(rows.values(), key=lambda row: row.version):
        view = make_version_view(row.expert_name, row.expert_task_kind, row, aliases_of.get(row.id, []))
        views.setdefault(row.expert_name, {})[row.version] = view
    served = []
    for head in heads:
        versions, named = views.get(head.expert_name, {}), aliases.get(head.expert_name, {})
        # as resolve(name): alias prod when set (nothing when its holder is archived), else the latest
        prod = named.get(DEFAULT_ALIAS)
        serving = head.version if prod is None else None if versions[prod].archived else prod
        served.append(
            ServedExpertView(head.expert_name, head.version, serving, dict(sorted(named.items())), versions)
        )
    return served


def versions_by_expert(engine: Engine) -> dict[str, list[ExpertVersionView]]:
    """Expert name → every version (archived included), oldest first, as `list_versions` gives them.

    One read transaction and two Core statements, instead of one ORM read per expert. The gateway reads
    only what it serves (`served_experts`); this reads every version (10,000 versions: ~0.3 s, see
    benchmarks/bench_registry_scale.py)."""
    with engine.connect() as connection:
        aliases: dict[int, list[str]] = {}
        for version_id, alias in connection.execute(Q_ALL_ALIASES):
            aliases.setdefault(version_id, []).append(alias)
        result: dict[str, list[ExpertVersionView]] = {}
        for row in connection.execute(Q_ALL_VERSIONS):
            view = make_version_view(row.expert_name, row.expert_task_kind, row, aliases.get(row.id, []))
            result.setdefault(row.expert_name, []).append(view)
    return result


def list_versions(engine: Engine, name: str, include_archived: bool = True) -> list[ExpertVersionView]:
    """Every version of `name`, oldest first."""
    with Session(engine) as session:
        expert = find_expert(session, name)
        query = select(ExpertVersion).where(ExpertVersion.expert_id == expert.id)
        if not include_archived:
            query = query.where(col(ExpertVersion.archived).is_(False))
        rows = session.exec(query.order_by(ExpertVersion.version)).all()
        aliases = aliases_by_version(session, expert.id)
        return [version_view(expert, row, aliases.get(row.id, [])) for row in rows]
