"""Finding expert versions and turning their rows into views: the pieces every registry operation shares.

`find_version` (ORM, inside write transactions) and `find_version_row` (Core, for the hot read path of
`resolve`) answer the same question the same way: `name@3` → that version, `name@<alias>` → the alias
holder, `name@latest` → the newest live version, plain `name` → alias prod if set, else latest.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any, cast

from sqlalchemy import Connection, Row, Select, Table, bindparam, func, or_
from sqlalchemy import select as sa_select
from sqlmodel import Session, col, select

from .errors import NotFoundError
from .models import Alias, Expert, ExpertVersion, Ref, as_utc, validate_name
from .store import Tree
from .views import ExpertVersionView, FileView

DEFAULT_ALIAS = "prod"

# resolve runs on every gateway request that names an expert, so it bypasses the ORM (no identity map,
# no per-row objects) and uses statements built once here; SQLAlchemy's compiled cache then makes each
# call one cached compile lookup.
_EXPERTS = cast(Table, Expert.__table__)
_VERSIONS = cast(Table, ExpertVersion.__table__)
_ALIASES = cast(Table, Alias.__table__)

_VERSION_ROWS = sa_select(
    *_VERSIONS.c,
    _EXPERTS.c.name.label("expert_name"),
    _EXPERTS.c.task_kind.label("expert_task_kind"),
).select_from(_VERSIONS.join(_EXPERTS, _EXPERTS.c.id == _VERSIONS.c.expert_id))
_VERSION_OF = _VERSION_ROWS.where(_EXPERTS.c.name == bindparam("name"))
Q_VERSION_NUMBER = _VERSION_OF.where(_VERSIONS.c.version == bindparam("version"))
# Joined on (expert_id, alias) so SQLite finds the alias through UNIQUE(expert_id, alias) instead of
# scanning every alias of every expert (benchmarks/bench_registry_scale.py).
Q_VERSION_ALIAS = _VERSION_OF.join(
    _ALIASES,
    (_ALIASES.c.expert_id == _EXPERTS.c.id) & (_ALIASES.c.version_id == _VERSIONS.c.id),
).where(_ALIASES.c.alias == bindparam("alias"))
Q_VERSION_LATEST = (
    _VERSION_OF.where(_VERSIONS.c.archived.is_(False)).order_by(_VERSIONS.c.version.desc()).limit(1)
)
# Every version of every expert, archived included, oldest first per expert (Registry.versions_by_expert).
Q_ALL_VERSIONS = _VERSION_ROWS.order_by(_EXPERTS.c.name, _VERSIONS.c.version)
Q_ALL_ALIASES = sa_select(_ALIASES.c.version_id, _ALIASES.c.alias).order_by(_ALIASES.c.alias)
# The gateway's state read (catalog.served_experts) reads what it serves, not every version: each expert
# with its newest live version (NULL columns without one), found by walking the (expert_id, version) index
# back from the newest, and every alias with its holder's row. SQLite searches expert_versions in both
# instead of scanning it (tests/registry/test_scale_reads.py).
_LIVE = _VERSIONS.alias("live")
_LATEST_LIVE_ID = (
    sa_select(_LIVE.c.id)
    .where(_LIVE.c.expert_id == _EXPERTS.c.id, _LIVE.c.archived.is_(False))
    .order_by(_LIVE.c.version.desc())
    .limit(1)
    .correlate(_EXPERTS)
    .scalar_subquery()
)
Q_LATEST_LIVE_ROWS = (
    sa_select(
        *_VERSIONS.c,
        _EXPERTS.c.name.label("expert_name"),
        _EXPERTS.c.task_kind.label("expert_task_kind"),
    )
    .select_from(_EXPERTS.outerjoin(_VERSIONS, _VERSIONS.c.id == _LATEST_LIVE_ID))
    .order_by(_EXPERTS.c.name)
)
Q_ALIAS_HOLDER_ROWS = (
    sa_select(
        _ALIASES.c.alias,
        *_VERSIONS.c,
        _EXPERTS.c.name.label("expert_name"),
        _EXPERTS.c.task_kind.label("expert_task_kind"),
    )
    .select_from(
        _ALIASES.join(_VERSIONS, _VERSIONS.c.id == _ALIASES.c.version_id).join(
            _EXPERTS, _EXPERTS.c.id == _VERSIONS.c.expert_id
        )
    )
    .order_by(_ALIASES.c.alias)
)
Q_EXPERT_ID = sa_select(_EXPERTS.c.id).where(_EXPERTS.c.name == bindparam("name"))


_NAMED = _EXPERTS.alias("named")


def numbered_versions(wanted: Mapping[str, Collection[int]]) -> Select[Any]:
    """The rows (as `find_version_row` gives them) of the versions `wanted` names, expert name → version
    numbers: one OR branch per expert, each searching the (expert_id, version) index for both columns (with
    the name on the joined experts instead, SQLite searches by expert_id only and reads all its versions)."""
    return _VERSION_ROWS.where(
        or_(*(
            (_VERSIONS.c.expert_id == sa_select(_NAMED.c.id).where(_NAMED.c.name == name).scalar_subquery())
            & _VERSIONS.c.version.in_(sorted(numbers))
            for name, numbers in wanted.items()
        ))
    )  # fmt: skip


def find_expert(session: Session, name: str, lock: bool = False) -> Expert:
    """The expert row named `name` (`lock`: FOR UPDATE); NotFoundError says how to create one."""
    query = select(Expert).where(Expert.name == validate_name(name))
    expert = session.exec(query.with_for_update() if lock else query).first()
    if expert is None:
        raise NotFoundError(f"no expert named {name!r}; see `moea registry list` or register a run first")
    return expert


def _alias_to_try(parsed: Ref) -> str | None:
    return parsed.alias or (None if parsed.latest or parsed.version else DEFAULT_ALIAS)


def find_version_row(connection: Connection, parsed: Ref, ref: str) -> Row[Any]:
    """Core twin of `find_version` for read paths: the version row plus `expert_name`/`expert_task_kind`."""
    alias = _alias_to_try(parsed)
    row: Row[Any] | None = None
    if parsed.version is not None:
        row = connection.execute(Q_VERSION_NUMBER, {"name": parsed.name, "version": parsed.version}).first()
    else:
        if alias is not None:
            row = connection.execute(Q_VERSION_ALIAS, {"name": parsed.name, "alias": alias}).first()
        if row is None and parsed.alias is None:
            row = connection.execute(Q_VERSION_LATEST, {"name": parsed.name}).first()
    if row is None:
        raise NotFoundError(not_found_message(connection, parsed, ref))
    return row


def find_version(session: Session, parsed: Ref, ref: str) -> ExpertVersion:
    """The version row `parsed` names (archived ones included); NotFoundError says what is missing."""
    base = (
        select(ExpertVersion)
        .join(Expert, col(Expert.id) == col(ExpertVersion.expert_id))
        .where(Expert.name == parsed.name)
    )
    alias = _alias_to_try(parsed)
    if parsed.version is not None:
        row = session.exec(base.where(ExpertVersion.version == parsed.version)).first()
    else:
        row = None
        if alias is not None:
            row = session.exec(
                base.join(Alias, col(Alias.version_id) == col(ExpertVersion.id)).where(Alias.alias == alias)
            ).first()
        if row is None and parsed.alias is None:
            row = session.exec(
                base.where(col(ExpertVersion.archived).is_(False))
                .order_by(col(ExpertVersion.version).desc())
                .limit(1)  # without it the ORM loads every version to return the first
            ).first()
    if row is None:
        raise NotFoundError(not_found_message(session.connection(), parsed, ref))
    return row


def not_found_message(connection: Connection, parsed: Ref, ref: str) -> str:
    """Why `ref` names no version, with the command that fixes it."""
    if connection.execute(Q_EXPERT_ID, {"name": parsed.name}).first() is None:
        return f"no expert named {parsed.name!r}; see `moea registry list` or register a run first"
    if parsed.alias:
        return f"{ref}: no version holds alias {parsed.alias!r}; set it with `moea registry promote NAME@V --alias {parsed.alias}`"
    if parsed.version is not None:
        return f"{ref}: {parsed.name} has no version {parsed.version}; see `moea registry show {parsed.name}`"
    return f"{ref}: every version of {parsed.name} is archived; restore one with `moea registry restore`"


def latest_version_number(session: Session, expert_id: int | None) -> int | None:
    """The highest version number of the expert (archived included), None before its first version."""
    return session.exec(
        sa_select(func.max(ExpertVersion.version)).where(ExpertVersion.expert_id == expert_id)
    ).one()[0]


def aliases_by_version(session: Session, expert_id: int | None) -> dict[int, list[str]]:
    """Version id → the aliases it holds (sorted), for one expert."""
    result: dict[int, list[str]] = {}
    for alias in session.exec(select(Alias).where(Alias.expert_id == expert_id).order_by(Alias.alias)).all():
        result.setdefault(alias.version_id, []).append(alias.alias)
    return result


def view_for(session: Session, row: ExpertVersion, tree: Tree | None = None) -> ExpertVersionView:
    """The view of `row` with its current aliases (and its file list when `tree` is given)."""
    expert = session.get(Expert, row.expert_id)
    assert expert is not None
    aliases = list(
        session.exec(select(Alias.alias).where(Alias.version_id == row.id).order_by(Alias.alias)).all()
    )
    return version_view(expert, row, aliases, tree)


def version_view(
    expert: Expert, row: ExpertVersion, aliases: list[str], tree: Tree | None = None
) -> ExpertVersionView:
    """The view of a version row of `expert`."""
    return make_version_view(expert.name, expert.task_kind, row, aliases, tree)


def make_version_view(
    name: str, expert_task_kind: str, row: Any, aliases: list[str], tree: Tree | None = None
) -> ExpertVersionView:
    """The view of a version; `row` is an ExpertVersion or a Core row with the same column names."""
    task = (row.config or {}).get("task") or {}
    return ExpertVersionView(
        name=name,
        version=row.version,
        sha256=row.sha256,
        base_model=row.base_model,
        metrics=dict(row.metrics or {}),
        created_at=as_utc(row.created_at),
        aliases=list(aliases),
        archived=bool(row.archived),
        base_model_name=row.base_model_name,
        base_model_sha256=row.base_model_sha256,
        task_kind=str(task.get("kind") or expert_task_kind),
        system_prompt=task.get("system_prompt"),
        config=dict(row.config or {}),
        tags=dict(row.tags or {}),
        run_dir=row.run_dir,
        mixture_sha256=row.mixture_sha256,
        git_commit=row.git_commit,
        parent_version=row.parent_version,
        created_by=row.created_by,
        size=tree.size if tree else 0,
        files=tuple(FileView(e.relpath, e.sha256, e.size) for e in tree.files) if tree else (),
    )
