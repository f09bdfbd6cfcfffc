"""Router versions: the routing head registered with each run, linked to the expert versions it routes to."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

from sqlalchemy import Engine, Table, bindparam
from sqlalchemy import select as sa_select
from sqlmodel import Session, select

from .artifacts import ArtifactTrees
from .errors import NotFoundError
from .models import Expert, ExpertVersion, RouterExpert, RouterVersion, as_utc
from .store import Tree
from .views import FileView, RouterVersionView

# latest_router runs on every gateway poll, so it bypasses the ORM and uses statements built once here
# (SQLAlchemy's compiled cache then makes each call one cached compile lookup).
_EXPERTS = cast(Table, Expert.__table__)
_VERSIONS = cast(Table, ExpertVersion.__table__)
_ROUTERS = cast(Table, RouterVersion.__table__)
_ROUTER_EXPERTS = cast(Table, RouterExpert.__table__)
Q_LATEST_ROUTER = (
    sa_select(_ROUTERS).where(_ROUTERS.c.archived.is_(False)).order_by(_ROUTERS.c.version.desc()).limit(1)
)
Q_ROUTER_LINKS = (
    sa_select(_ROUTER_EXPERTS.c.label, _EXPERTS.c.name, _VERSIONS.c.version)
    .select_from(
        _ROUTER_EXPERTS.join(_VERSIONS, _VERSIONS.c.id == _ROUTER_EXPERTS.c.expert_version_id).join(
            _EXPERTS, _EXPERTS.c.id == _VERSIONS.c.expert_id
        )
    )
    .where(_ROUTER_EXPERTS.c.router_version_id == bindparam("router_id"))
    .order_by(_ROUTER_EXPERTS.c.id)
)


def latest_router(engine: Engine) -> RouterVersionView | None:
    """The newest live router version, or None when no run with a router was registered."""
    with engine.connect() as connection:
        row = connection.execute(Q_LATEST_ROUTER).first()
        if row is None:
            return None
        links = connection.execute(Q_ROUTER_LINKS, {"router_id": row.id}).all()
    return make_router_view(row, links)


def get_router(engine: Engine, trees: ArtifactTrees, version: int) -> RouterVersionView:
    """One router version, with its file list."""
    with Session(engine) as session:
        row = session.exec(select(RouterVersion).where(RouterVersion.version == version)).first()
        if row is None:
            raise NotFoundError(f"no router version {version}; see `moea registry routers`")
        return router_view(session, row, trees.get(session, row.sha256))


def list_routers(engine: Engine) -> list[RouterVersionView]:
    """Every router version, oldest first."""
    with Session(engine) as session:
        rows = session.exec(select(RouterVersion).order_by(RouterVersion.version)).all()
        return [router_view(session, row) for row in rows]


def router_view(session: Session, row: RouterVersion, tree: Tree | None = None) -> RouterVersionView:
    """The view of a router row with the expert versions it links to (and its files when `tree` is given)."""
    links = session.connection().execute(Q_ROUTER_LINKS, {"router_id": row.id}).all()
    return make_router_view(row, links, tree)


def make_router_view(row: Any, links: Sequence[Any], tree: Tree | None = None) -> RouterVersionView:
    """The view of a router version; `row` is a RouterVersion or a Core row; `links` (label, name, version)."""
    return RouterVersionView(
        version=row.version,
        sha256=row.sha256,
        encoder=row.encoder,
        labels=list(row.labels or []),
        metrics=dict(row.metrics or {}),
        experts={label: f"{name}@{v}" for label, name, v in links},
        created_at=as_utc(row.created_at),
        archived=bool(row.archived),
        run_dir=row.run_dir,
        files=tuple(FileView(e.relpath, e.sha256, e.size) for e in tree.files) if tree else (),
    )
