"""The registry's operations. Each public method is one database transaction (retried internally).

Typical use::

    reg = Registry()                         # MOEA_REGISTRY_URL or sqlite:///$MOEA_HOME/registry.db
    result = reg.register_run("runs/demo")   # every expert → a new immutable version, plus the router
    view = reg.resolve("summarize@prod")     # "name", "name@latest", "name@<alias>", "name@3"
    folder = reg.artifact_path(view)         # verified PEFT adapter folder for vLLM

Version numbers are assigned inside the write transaction that inserts them (UNIQUE(expert, version)
backs this up), artifacts are copied into the content-addressed store *before* that transaction and
only referenced by it, so a crash at any point leaves either a complete version or none.
"""

from __future__ import annotations

import getpass
import math
import secrets
import socket
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from sqlalchemy import Connection, Row, Table, bindparam, func, insert, update
from sqlalchemy import select as sa_select
from sqlalchemy.exc import IntegrityError as SAIntegrityError
from sqlmodel import Session, col, select

from . import db
from .errors import ConflictError, NotFoundError, ValidationError
from .models import (
    Alias,
    AliasEvent,
    AliasEventView,
    Arm,
    Artifact,
    ArtifactFile,
    Experiment,
    ExperimentView,
    Expert,
    ExpertVersion,
    ExpertVersionView,
    ExpertView,
    FileView,
    Outcome,
    OutcomeRecord,
    Ref,
    RegisterResult,
    RegistryState,
    RequestLog,
    RequestRecord,
    RouterExpert,
    RouterVersion,
    RouterVersionView,
    as_utc,
    parse_ref,
    utcnow,
    validate_alias,
    validate_name,
)
from .rundir import ExpertPlan, RunPlan, read_run_dir
from .store import ArtifactStore, FileEntry, GcReport, Tree

if TYPE_CHECKING:
    from .transfer import ImportResult

DEFAULT_ALIAS = "prod"
METRICS = ("reward", "thumbs")

# ---------------------------------------------------------------- Core statements of the hot read paths
# resolve / state_token / latest_router run on every gateway poll and the A/B reads scan tens of
# thousands of rows, so they bypass the ORM (no identity map, no per-row objects) and use statements
# built once here; SQLAlchemy's compiled cache then makes each call one cached compile lookup.
_EXPERTS = cast(Table, Expert.__table__)
_VERSIONS = cast(Table, ExpertVersion.__table__)
_ALIASES = cast(Table, Alias.__table__)
_ROUTERS = cast(Table, RouterVersion.__table__)
_ROUTER_EXPERTS = cast(Table, RouterExpert.__table__)
_REQUESTS = cast(Table, RequestLog.__table__)
_OUTCOMES = cast(Table, Outcome.__table__)
_STATE = cast(Table, RegistryState.__table__)

_VERSION_OF = (
    sa_select(
        *_VERSIONS.c,
        _EXPERTS.c.name.label("expert_name"),
        _EXPERTS.c.task_kind.label("expert_task_kind"),
    )
    .select_from(_VERSIONS.join(_EXPERTS, _EXPERTS.c.id == _VERSIONS.c.expert_id))
    .where(_EXPERTS.c.name == bindparam("name"))
)
Q_VERSION_NUMBER = _VERSION_OF.where(_VERSIONS.c.version == bindparam("version"))
Q_VERSION_ALIAS = _VERSION_OF.join(_ALIASES, _ALIASES.c.version_id == _VERSIONS.c.id).where(
    _ALIASES.c.alias == bindparam("alias")
)
Q_VERSION_LATEST = (
    _VERSION_OF.where(_VERSIONS.c.archived.is_(False)).order_by(_VERSIONS.c.version.desc()).limit(1)
)
Q_ALIASES_OF_VERSION = (
    sa_select(_ALIASES.c.alias)
    .where(_ALIASES.c.version_id == bindparam("version_id"))
    .order_by(_ALIASES.c.alias)
)
Q_EXPERT_ID = sa_select(_EXPERTS.c.id).where(_EXPERTS.c.name == bindparam("name"))
Q_STATE = sa_select(_STATE.c.counter).where(_STATE.c.id == 1)
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
_REQUEST_FIELDS = (
    "request_id",
    "created_at",
    "expert",
    "version",
    "experiment_id",
    "user",
    "routed",
    "latency_ms",
    "prompt_tokens",
    "completion_tokens",
    "status_code",
    "shadow",
)
Q_EXPERIMENT_REQUESTS = (
    sa_select(*(_REQUESTS.c[name] for name in _REQUEST_FIELDS))
    .where(_REQUESTS.c.experiment_id == bindparam("experiment_id"))
    .order_by(_REQUESTS.c.id)
)
Q_EXPERIMENT_OUTCOMES = (
    sa_select(_OUTCOMES.c.request_id, _OUTCOMES.c.created_at, _OUTCOMES.c.reward, _OUTCOMES.c.thumbs)
    .where(
        _OUTCOMES.c.request_id.in_(
            sa_select(_REQUESTS.c.request_id).where(_REQUESTS.c.experiment_id == bindparam("experiment_id"))
        )
    )
    .order_by(_OUTCOMES.c.id)
)


def default_actor() -> str:
    """`user@host` of the calling process (recorded on every write)."""
    try:
        user = getpass.getuser()
    except Exception:  # noqa: BLE001 - no passwd entry in some containers
        user = "unknown"
    return f"{user}@{socket.gethostname()}"[:128]


@dataclass(frozen=True)
class VersionDiff:
    """Differences between two versions: `(key, a, b)` rows for metrics, config and files."""

    a: ExpertVersionView
    b: ExpertVersionView
    metrics: list[tuple[str, Any, Any]]
    config: list[tuple[str, Any, Any]]
    files: list[tuple[str, str | None, str | None]]


@dataclass
class VerifyReport:
    """Result of a strict `verify`: problems found and what `--repair` fixed."""

    artifacts: int = 0
    blobs: int = 0
    bytes: int = 0
    problems: list[str] = field(default_factory=list)
    repaired: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


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


class Registry:
    """The system of record for experts, routers, aliases and experiments."""

    def __init__(
        self, url: str | None = None, store_dir: Path | str | None = None, *, upgrade: bool = True
    ) -> None:
        """Open (and migrate to head, unless `upgrade=False`) the registry at `url`; artifacts go to `store_dir`."""
        self.url = url or db.default_url()
        self.engine = db.open_engine(self.url, upgrade=upgrade)
        self.store = ArtifactStore(store_dir or db.default_store_dir())
        self._trees: dict[str, Tree] = {}

    def close(self) -> None:
        """Release pooled connections."""
        self.engine.dispose()

    def __enter__(self) -> Registry:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------------------ register

    def register_run(self, run_dir: Path | str, actor: str | None = None) -> RegisterResult:
        """Record every expert of `run_dir` as a new version (and its router) in one transaction."""
        plan = read_run_dir(run_dir)
        actor = actor or default_actor()
        trees = {expert.name: self.store.put_tree(expert.folder) for expert in plan.experts}
        router_tree = self.store.put_tree(plan.router.folder) if plan.router else None

        def work(session: Session) -> RegisterResult:
            self._bump(session)
            self._ensure_blobs(trees, router_tree, plan)
            views, version_ids = [], {}
            for expert in plan.experts:
                row, expert_row = self._insert_version(session, plan, expert, trees[expert.name], actor)
                version_ids[expert.name] = row.id
                views.append(self._view(expert_row, row, [], trees[expert.name]))
            router_view = None
            if plan.router and router_tree:
                router_view = self._insert_router(session, plan, router_tree, version_ids, actor)
            return RegisterResult(experts=views, router=router_view)

        return db.run_transaction(self.engine, work, retry_conflicts=True)

    def _ensure_blobs(self, trees: dict[str, Tree], router_tree: Tree | None, plan: RunPlan) -> None:
        """Under the write lock: every blob we are about to reference must exist (gc may have raced us)."""
        folders = {e.name: e.folder for e in plan.experts}
        pairs = [(trees[name], folders[name]) for name in trees]
        if router_tree and plan.router:
            pairs.append((router_tree, plan.router.folder))
        for tree, folder in pairs:
            if self.store.missing_blobs(tree.files) and self.store.put_tree(folder).sha256 != tree.sha256:
                raise ValidationError(f"{folder} changed while it was being registered; register it again")

    def _insert_version(
        self, session: Session, plan: RunPlan, expert: ExpertPlan, tree: Tree, actor: str
    ) -> tuple[ExpertVersion, Expert]:
        now = utcnow()
        expert_row = session.exec(select(Expert).where(Expert.name == expert.name).with_for_update()).first()
        if expert_row is None:
            expert_row = Expert(
                name=expert.name,
                description=expert.description,
                task_kind=expert.kind,
                base_model=plan.base_model,
                base_model_sha256=plan.base_model_sha256,
            )
            session.add(expert_row)
            session.flush()  # a concurrent first registration fails here on UNIQUE(name) and is retried
        else:
            expert_row.task_kind, expert_row.updated_at = expert.kind, now
            expert_row.base_model, expert_row.base_model_sha256 = plan.base_model, plan.base_model_sha256
            expert_row.description = expert.description or expert_row.description
        latest = session.exec(
            sa_select(func.max(ExpertVersion.version)).where(ExpertVersion.expert_id == expert_row.id)
        ).one()[0]
        artifact = self._artifact_row(session, tree, "expert")
        row = ExpertVersion(
            expert_id=expert_row.id,
            version=(latest or 0) + 1,
            artifact_id=artifact.id,
            sha256=tree.sha256,
            base_model=plan.base_model,
            base_model_name=plan.base_model_name,
            base_model_sha256=plan.base_model_sha256,
            metrics=expert.metrics,
            config=expert.config,
            tags={},
            run_dir=str(plan.run_dir),
            mixture_sha256=plan.mixture_sha256,
            git_commit=plan.git_commit,
            parent_version=latest,
            created_at=now,
            created_by=actor,
        )
        session.add(row)
        session.flush()
        return row, expert_row

    def _artifact_row(self, session: Session, tree: Tree, kind: str) -> Artifact:
        artifact = session.exec(select(Artifact).where(Artifact.sha256 == tree.sha256)).first()
        if artifact is not None:
            return artifact
        artifact = Artifact(sha256=tree.sha256, kind=kind, size=tree.size, file_count=len(tree.files))
        session.add(artifact)
        session.flush()
        session.add_all(
            ArtifactFile(artifact_id=artifact.id, relpath=e.relpath, sha256=e.sha256, size=e.size)
            for e in tree.files
        )
        return artifact

    def _insert_router(
        self, session: Session, plan: RunPlan, tree: Tree, version_ids: dict[str, int], actor: str
    ) -> RouterVersionView:
        assert plan.router is not None
        latest = session.exec(sa_select(func.max(RouterVersion.version))).one()[0]
        artifact = self._artifact_row(session, tree, "router")
        row = RouterVersion(
            version=(latest or 0) + 1,
            artifact_id=artifact.id,
            sha256=tree.sha256,
            encoder=plan.router.encoder,
            labels=plan.router.labels,
            metrics=plan.router.metrics,
            run_dir=str(plan.run_dir),
            mixture_sha256=plan.mixture_sha256,
            git_commit=plan.git_commit,
            created_by=actor,
        )
        session.add(row)
        session.flush()
        for label in plan.router.labels:
            version_id = version_ids.get(label)
            if version_id is not None:
                session.add(RouterExpert(router_version_id=row.id, label=label, expert_version_id=version_id))
        session.flush()
        return self._router_view(session, row, tree)

    # ------------------------------------------------------------------------------ reads

    def resolve(self, ref: str, include_archived: bool = False) -> ExpertVersionView:
        """`name` (→ alias prod if set, else latest), `name@latest`, `name@<alias>`, `name@3` → a version."""
        parsed = parse_ref(ref)
        with self.engine.connect() as connection:  # one read transaction: a consistent snapshot
            row = self._find_version_row(connection, parsed, ref)
            if row.archived and not include_archived:
                raise NotFoundError(
                    f"{parsed.name}@{row.version} is archived; restore it with `moea registry restore "
                    f"{parsed.name}@{row.version}` or pick another version"
                )
            aliases = list(connection.execute(Q_ALIASES_OF_VERSION, {"version_id": row.id}).scalars())
        return self._make_view(row.expert_name, row.expert_task_kind, row, aliases)

    def _find_version_row(self, connection: Connection, parsed: Ref, ref: str) -> Row[Any]:
        """Core twin of `_find_version` for read paths: the version row plus `expert_name`/`expert_task_kind`."""
        alias = parsed.alias or (None if parsed.latest or parsed.version else DEFAULT_ALIAS)
        row: Row[Any] | None = None
        if parsed.version is not None:
            row = connection.execute(
                Q_VERSION_NUMBER, {"name": parsed.name, "version": parsed.version}
            ).first()
        else:
            if alias is not None:
                row = connection.execute(Q_VERSION_ALIAS, {"name": parsed.name, "alias": alias}).first()
            if row is None and parsed.alias is None:
                row = connection.execute(Q_VERSION_LATEST, {"name": parsed.name}).first()
        if row is None:
            raise NotFoundError(self._not_found_message(connection, parsed, ref))
        return row

    def _find_version(self, session: Session, parsed: Ref, ref: str) -> ExpertVersion:
        base = (
            select(ExpertVersion)
            .join(Expert, col(Expert.id) == col(ExpertVersion.expert_id))
            .where(Expert.name == parsed.name)
        )
        alias = parsed.alias or (None if parsed.latest or parsed.version else DEFAULT_ALIAS)
        if parsed.version is not None:
            row = session.exec(base.where(ExpertVersion.version == parsed.version)).first()
        else:
            row = None
            if alias is not None:
                row = session.exec(
                    base.join(Alias, col(Alias.version_id) == col(ExpertVersion.id)).where(
                        Alias.alias == alias
                    )
                ).first()
            if row is None and parsed.alias is None:
                row = session.exec(
                    base.where(col(ExpertVersion.archived).is_(False))
                    .order_by(col(ExpertVersion.version).desc())
                    .limit(1)  # without it the ORM loads every version to return the first
                ).first()
        if row is None:
            raise NotFoundError(self._not_found_message(session.connection(), parsed, ref))
        return row

    @staticmethod
    def _not_found_message(connection: Connection, parsed: Ref, ref: str) -> str:
        if connection.execute(Q_EXPERT_ID, {"name": parsed.name}).first() is None:
            return f"no expert named {parsed.name!r}; see `moea registry list` or register a run first"
        if parsed.alias:
            return f"{ref}: no version holds alias {parsed.alias!r}; set it with `moea registry promote NAME@V --alias {parsed.alias}`"
        if parsed.version is not None:
            return f"{ref}: {parsed.name} has no version {parsed.version}; see `moea registry show {parsed.name}`"
        return f"{ref}: every version of {parsed.name} is archived; restore one with `moea registry restore`"

    def get_version(self, name: str, version: int) -> ExpertVersionView:
        """One version (archived or not) with its file list."""
        with Session(self.engine) as session:
            row = self._find_version(session, Ref(validate_name(name), version=version), f"{name}@{version}")
            return self._view_for(session, row, with_files=True)

    def list_experts(self) -> list[ExpertView]:
        """Every expert with its latest live version and aliases."""
        with Session(self.engine) as session:
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

    def list_versions(self, name: str, include_archived: bool = True) -> list[ExpertVersionView]:
        """Every version of `name`, oldest first."""
        with Session(self.engine) as session:
            expert = self._expert(session, name)
            query = select(ExpertVersion).where(ExpertVersion.expert_id == expert.id)
            if not include_archived:
                query = query.where(col(ExpertVersion.archived).is_(False))
            rows = session.exec(query.order_by(ExpertVersion.version)).all()
            aliases = self._aliases_by_version(session, expert.id)
            return [self._view(expert, row, aliases.get(row.id, [])) for row in rows]

    def _expert(self, session: Session, name: str, lock: bool = False) -> Expert:
        query = select(Expert).where(Expert.name == validate_name(name))
        expert = session.exec(query.with_for_update() if lock else query).first()
        if expert is None:
            raise NotFoundError(f"no expert named {name!r}; see `moea registry list` or register a run first")
        return expert

    def _aliases_by_version(self, session: Session, expert_id: int) -> dict[int, list[str]]:
        result: dict[int, list[str]] = {}
        for alias in session.exec(
            select(Alias).where(Alias.expert_id == expert_id).order_by(Alias.alias)
        ).all():
            result.setdefault(alias.version_id, []).append(alias.alias)
        return result

    def _view_for(self, session: Session, row: ExpertVersion, with_files: bool = False) -> ExpertVersionView:
        expert = session.get(Expert, row.expert_id)
        assert expert is not None
        aliases = list(
            session.exec(select(Alias.alias).where(Alias.version_id == row.id).order_by(Alias.alias)).all()
        )
        tree = self._tree(session, row.sha256) if with_files else None
        return self._view(expert, row, aliases, tree)

    @classmethod
    def _view(
        cls, expert: Expert, row: ExpertVersion, aliases: list[str], tree: Tree | None = None
    ) -> ExpertVersionView:
        return cls._make_view(expert.name, expert.task_kind, row, aliases, tree)

    @staticmethod
    def _make_view(
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

    def _tree(self, session: Session, sha256: str) -> Tree:
        """The file list of an artifact (immutable, so cached per process)."""
        tree = self._trees.get(sha256)
        if tree is None:
            artifact = session.exec(select(Artifact).where(Artifact.sha256 == sha256)).first()
            if artifact is None:
                raise NotFoundError(f"no artifact with sha256 {sha256[:12]}… in this registry")
            files = session.exec(
                select(ArtifactFile)
                .where(ArtifactFile.artifact_id == artifact.id)
                .order_by(ArtifactFile.relpath)
            ).all()
            tree = Tree(sha256, tuple(FileEntry(f.relpath, f.sha256, f.size) for f in files))
            self._trees[sha256] = tree
        return tree

    def artifact_path(self, view: ExpertVersionView) -> Path:
        """A complete, verified folder holding the version's PEFT adapter (raises IntegrityError if tampered)."""
        with Session(self.engine) as session:
            tree = self._tree(session, view.sha256)
        return self.store.materialize(tree, label=view.ref)

    def state_token(self) -> str:
        """Changes whenever anything that affects serving changes (one indexed row read)."""
        with self.engine.connect() as connection:
            return str(connection.execute(Q_STATE).scalar_one())

    @staticmethod
    def _bump(session: Session) -> None:
        """Advance the state counter; on PostgreSQL this row lock also serialises writers."""
        session.connection().execute(
            update(RegistryState)
            .where(col(RegistryState.id) == 1)
            .values(counter=RegistryState.counter + 1, updated_at=utcnow())
        )

    # ------------------------------------------------------------------------------ routers

    def latest_router(self) -> RouterVersionView | None:
        """The newest live router version, or None when no run with a router was registered."""
        with self.engine.connect() as connection:
            row = connection.execute(Q_LATEST_ROUTER).first()
            if row is None:
                return None
            links = connection.execute(Q_ROUTER_LINKS, {"router_id": row.id}).all()
        return self._make_router_view(row, links)

    def get_router(self, version: int) -> RouterVersionView:
        """One router version."""
        with Session(self.engine) as session:
            row = session.exec(select(RouterVersion).where(RouterVersion.version == version)).first()
            if row is None:
                raise NotFoundError(f"no router version {version}; see `moea registry routers`")
            return self._router_view(session, row, self._tree(session, row.sha256))

    def list_routers(self) -> list[RouterVersionView]:
        """Every router version, oldest first."""
        with Session(self.engine) as session:
            rows = session.exec(select(RouterVersion).order_by(RouterVersion.version)).all()
            return [self._router_view(session, row) for row in rows]

    def _router_view(
        self, session: Session, row: RouterVersion, tree: Tree | None = None
    ) -> RouterVersionView:
        links = session.connection().execute(Q_ROUTER_LINKS, {"router_id": row.id}).all()
        return self._make_router_view(row, links, tree)

    @staticmethod
    def _make_router_view(row: Any, links: Sequence[Any], tree: Tree | None = None) -> RouterVersionView:
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

    def router_artifact_path(self, view: RouterVersionView) -> Path:
        """A complete, verified folder with router.json + head.safetensors."""
        with Session(self.engine) as session:
            tree = self._tree(session, view.sha256)
        return self.store.materialize(tree, label=view.ref)

    # ------------------------------------------------------------------------------ aliases

    def promote(
        self, ref: str, alias: str = DEFAULT_ALIAS, actor: str | None = None, reason: str = ""
    ) -> ExpertVersionView:
        """Point `alias` of the expert at the version `ref` names (recorded in the alias history)."""
        validate_alias(alias)
        parsed = parse_ref(ref)

        def work(session: Session) -> ExpertVersionView:
            self._bump(session)
            self._expert(session, parsed.name, lock=True)
            row = self._find_version(session, parsed, ref)
            if row.archived:
                raise ConflictError(
                    f"{parsed.name}@{row.version} is archived; restore it before promoting it"
                )
            self._move_alias(session, row.expert_id, alias, row, "promote", actor, reason)
            return self._view_for(session, row)

        return db.run_transaction(self.engine, work)

    def _move_alias(
        self,
        session: Session,
        expert_id: int,
        alias: str,
        target: ExpertVersion | None,
        action: str,
        actor: str | None,
        reason: str,
    ) -> None:
        current = session.exec(
            select(Alias).where(Alias.expert_id == expert_id, Alias.alias == alias).with_for_update()
        ).first()
        from_version = session.get(ExpertVersion, current.version_id).version if current else None  # type: ignore[union-attr]
        to_version = target.version if target else None
        if from_version == to_version:
            return
        now, actor = utcnow(), actor or default_actor()
        if target is None:
            session.delete(current)
        elif current is None:
            session.add(
                Alias(
                    expert_id=expert_id, alias=alias, version_id=target.id, updated_at=now, updated_by=actor
                )
            )
        else:
            current.version_id, current.updated_at, current.updated_by = target.id, now, actor
        session.add(
            AliasEvent(
                expert_id=expert_id,
                alias=alias,
                action=action,
                from_version=from_version,
                to_version=to_version,
                actor=actor,
                reason=reason,
                created_at=now,
            )
        )
        session.flush()

    def rollback(
        self, name: str, alias: str = DEFAULT_ALIAS, actor: str | None = None, reason: str = ""
    ) -> ExpertVersionView:
        """Move `alias` back to the version that held it before the current holder."""
        validate_alias(alias)

        def work(session: Session) -> ExpertVersionView:
            self._bump(session)
            expert = self._expert(session, name, lock=True)
            events = session.exec(
                select(AliasEvent)
                .where(AliasEvent.expert_id == expert.id, AliasEvent.alias == alias)
                .order_by(AliasEvent.id)
            ).all()
            previous: list[int | None] = []
            for event in events:  # replay: every move pushes the old holder, every rollback pops one
                if event.action == "rollback":
                    if previous:
                        previous.pop()
                else:
                    previous.append(event.from_version)
            target_version = previous[-1] if previous else None
            if target_version is None:
                raise ConflictError(
                    f"{name}@{alias} has no previous holder to roll back to; use `moea registry promote`"
                )
            row = self._find_version(session, Ref(name, version=target_version), f"{name}@{target_version}")
            if row.archived:
                raise ConflictError(
                    f"the previous holder {name}@{target_version} is archived; restore it or promote a version explicitly"
                )
            self._move_alias(session, expert.id, alias, row, "rollback", actor, reason)
            return self._view_for(session, row)

        return db.run_transaction(self.engine, work)

    def remove_alias(self, name: str, alias: str, actor: str | None = None, reason: str = "") -> None:
        """Delete an alias (kept in history); `name` then resolves to its latest version."""
        validate_alias(alias)

        def work(session: Session) -> None:
            self._bump(session)
            expert = self._expert(session, name, lock=True)
            self._move_alias(session, expert.id, alias, None, "remove", actor, reason)

        db.run_transaction(self.engine, work)

    def history(self, name: str, alias: str | None = None) -> list[AliasEventView]:
        """The append-only alias history of `name`, oldest first."""
        with Session(self.engine) as session:
            expert = self._expert(session, name)
            query = select(AliasEvent).where(AliasEvent.expert_id == expert.id)
            if alias is not None:
                query = query.where(AliasEvent.alias == validate_alias(alias))
            return [
                AliasEventView(
                    name=expert.name,
                    alias=e.alias,
                    action=e.action,
                    from_version=e.from_version,
                    to_version=e.to_version,
                    actor=e.actor,
                    reason=e.reason,
                    created_at=as_utc(e.created_at),
                )
                for e in session.exec(query.order_by(AliasEvent.id)).all()
            ]

    # ------------------------------------------------------------------------------ archive

    def archive(
        self, ref: str, force: bool = False, actor: str | None = None, reason: str = ""
    ) -> ExpertVersionView:
        """Soft-delete `name@version`. A version holding an alias needs `force` (which removes the aliases)."""
        parsed = parse_ref(ref)
        if parsed.version is None:
            raise ValidationError(f"archive needs an explicit version, e.g. {parsed.name}@3 (got {ref!r})")

        def work(session: Session) -> ExpertVersionView:
            self._bump(session)
            expert = self._expert(session, parsed.name, lock=True)
            row = self._find_version(session, parsed, ref)
            aliases = session.exec(select(Alias).where(Alias.version_id == row.id)).all()
            if aliases and not force:
                names = ", ".join(sorted(a.alias for a in aliases))
                raise ConflictError(
                    f"{ref} holds alias {names}; promote another version first or pass --force to drop the alias"
                )
            running = self._running_experiment(session, expert.id)
            if running and row.version in {arm["version"] for arm in running.arms} | {running.shadow_version}:
                raise ConflictError(
                    f"{ref} is in running experiment {running.id}; stop it first (`moea ab stop {parsed.name}`)"
                )
            for alias in aliases:
                self._move_alias(
                    session, expert.id, alias.alias, None, "remove", actor, reason or f"archived {ref}"
                )
            row.archived, row.archived_at = True, utcnow()
            session.add(row)
            session.flush()
            return self._view_for(session, row)

        return db.run_transaction(self.engine, work)

    def restore(self, ref: str, actor: str | None = None) -> ExpertVersionView:
        """Undo `archive` for `name@version`."""
        parsed = parse_ref(ref)
        if parsed.version is None:
            raise ValidationError(f"restore needs an explicit version, e.g. {parsed.name}@3 (got {ref!r})")

        def work(session: Session) -> ExpertVersionView:
            self._bump(session)
            row = self._find_version(session, parsed, ref)
            row.archived, row.archived_at = False, None
            session.add(row)
            session.flush()
            return self._view_for(session, row)

        return db.run_transaction(self.engine, work)

    # ------------------------------------------------------------------------------ diff / verify / gc

    def diff(self, ref_a: str, ref_b: str) -> VersionDiff:
        """Metrics, config and file-hash differences between two versions (any experts)."""
        views = []
        for ref in (ref_a, ref_b):
            with Session(self.engine) as session:
                row = self._find_version(session, parse_ref(ref), ref)
                views.append(self._view_for(session, row, with_files=True))
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

    def verify(self, repair: bool = False) -> VerifyReport:
        """Strict check: every blob re-hashed, every tree hash recomputed, every materialised view re-hashed.

        `repair` drops damaged views (rebuilt from blobs on next use) and rewrites damaged blobs from an
        intact view file when one exists.
        """
        report = VerifyReport()
        with Session(self.engine) as session:
            shas = session.exec(select(Artifact.sha256).order_by(Artifact.id)).all()
            trees = [self._tree(session, sha) for sha in shas]
        seen: set[str] = set()
        for tree in trees:
            report.artifacts += 1
            label = f"artifact {tree.sha256[:12]}…"
            try:
                self.store._check_tree(tree, label)
            except Exception as error:  # noqa: BLE001 - reported, not raised
                report.problems.append(str(error))
                continue
            view = self.store.view_path(tree.sha256)
            for entry in tree.files:
                if entry.sha256 in seen:
                    continue
                seen.add(entry.sha256)
                report.blobs += 1
                report.bytes += entry.size
                problem = self.store.verify_blob(entry)
                if problem:
                    report.problems.append(problem)
                    if repair and self.store.restore_blob(entry, view / entry.relpath):
                        report.repaired.append(
                            f"blob {entry.sha256[:12]}… restored from {view / entry.relpath}"
                        )
            if view.exists():
                try:
                    self.store.verify_view(tree, label)
                except Exception as error:  # noqa: BLE001 - reported, not raised
                    report.problems.append(str(error))
                    if repair:
                        self.store.drop_view(tree.sha256)
                        report.repaired.append(f"view {view} removed; it is rebuilt from blobs on next use")
        return report

    def gc(self, grace_s: float = 3600.0, dry_run: bool = False) -> GcReport:
        """Remove temp files, unreferenced blobs and views older than `grace_s`, holding the write lock."""

        def work(session: Session) -> GcReport:
            self._bump(session)  # takes the write lock: no register can commit while we collect
            blobs = set(session.exec(select(ArtifactFile.sha256).distinct()).all())
            trees = set(session.exec(select(Artifact.sha256)).all())
            return self.store.gc(blobs, trees, grace_s=grace_s, dry_run=dry_run)

        return db.run_transaction(self.engine, work)

    def export(self, refs: list[str], out_path: Path | str) -> dict[str, Any]:
        """Write the versions named by `refs` into a tar.gz (manifest + blobs); returns the manifest."""
        from .transfer import export_versions

        return export_versions(self, refs, Path(out_path))

    def import_archive(self, path: Path | str, actor: str | None = None) -> ImportResult:
        """Import an export tar.gz in one transaction; versions get new numbers in this registry."""
        from .transfer import import_archive

        return import_archive(self, Path(path), actor)

    # ------------------------------------------------------------------------------ experiments

    def start_experiment(
        self,
        expert: str,
        arms: Sequence[tuple[int, float]],
        metric: str = "reward",
        salt: str | None = None,
        shadow_version: int | None = None,
        actor: str | None = None,
    ) -> ExperimentView:
        """Start an A/B experiment over versions of `expert`; at most one runs per expert."""
        if metric not in METRICS:
            raise ValidationError(f"unknown metric {metric!r}; use one of {', '.join(METRICS)}")
        parsed_arms = [Arm(int(v), float(w)) for v, w in arms]
        if not parsed_arms or any(not math.isfinite(a.weight) or a.weight <= 0 for a in parsed_arms):
            raise ValidationError(
                "experiment arms need at least one VERSION:WEIGHT with a positive finite weight"
            )
        versions = [a.version for a in parsed_arms]
        if len(set(versions)) != len(versions):
            raise ValidationError(f"experiment arms repeat a version: {versions}")
        if shadow_version is not None and shadow_version in versions:
            raise ValidationError(
                f"shadow version {shadow_version} is also an arm; pick a version outside the arms"
            )

        def work(session: Session) -> ExperimentView:
            self._bump(session)
            row = self._expert(session, expert, lock=True)
            running = self._running_experiment(session, row.id)
            if running:
                raise ConflictError(f"experiment {running.id} is already running for {expert}; stop it first")
            for version in [*versions, *([shadow_version] if shadow_version is not None else [])]:
                found = self._find_version(session, Ref(row.name, version=version), f"{expert}@{version}")
                if found.archived:
                    raise ConflictError(
                        f"{expert}@{version} is archived; restore it before experimenting with it"
                    )
            experiment = Experiment(
                expert_id=row.id,
                arms=[asdict(a) for a in parsed_arms],
                metric=metric,
                salt=salt or secrets.token_hex(8),
                shadow_version=shadow_version,
                created_by=actor or default_actor(),
            )
            session.add(experiment)
            session.flush()
            return self._experiment_view(experiment, row.name)

        try:
            return db.run_transaction(self.engine, work)
        except SAIntegrityError:
            raise ConflictError(
                f"another experiment was started for {expert} at the same time; stop it first"
            ) from None

    def _running_experiment(self, session: Session, expert_id: int) -> Experiment | None:
        return session.exec(
            select(Experiment).where(Experiment.expert_id == expert_id, Experiment.status == "running")
        ).first()

    @staticmethod
    def _experiment_view(row: Experiment, expert: str) -> ExperimentView:
        return ExperimentView(
            id=row.id or 0,
            expert=expert,
            arms=[Arm(int(a["version"]), float(a["weight"])) for a in row.arms],
            metric=row.metric,
            salt=row.salt,
            status=row.status,
            shadow_version=row.shadow_version,
            started_at=as_utc(row.started_at),
            stopped_at=as_utc(row.stopped_at),
            winner=row.winner,
        )

    def _experiments(self, session: Session, *conditions: Any) -> list[ExperimentView]:
        query = sa_select(Experiment, Expert.name).join(Expert, col(Expert.id) == col(Experiment.expert_id))
        rows = session.exec(query.where(*conditions).order_by(col(Experiment.id))).all()
        return [self._experiment_view(experiment, name) for experiment, name in rows]

    def active_experiment(self, expert: str) -> ExperimentView | None:
        """The running experiment of `expert`, if any."""
        with Session(self.engine) as session:
            found = self._experiments(
                session, Expert.name == validate_name(expert), Experiment.status == "running"
            )
            return found[0] if found else None

    def active_experiments(self) -> list[ExperimentView]:
        """Every running experiment."""
        with Session(self.engine) as session:
            return self._experiments(session, Experiment.status == "running")

    def list_experiments(self, expert: str | None = None) -> list[ExperimentView]:
        """All experiments (of one expert when given), oldest first."""
        with Session(self.engine) as session:
            conditions = [Expert.name == validate_name(expert)] if expert else []
            return self._experiments(session, *conditions)

    def get_experiment(self, expert_or_id: str | int) -> ExperimentView:
        """An experiment by id (int, or digits that are not an expert name) or the latest one of an expert."""
        with Session(self.engine) as session:
            if (
                isinstance(expert_or_id, str)
                and session.exec(select(Expert.id).where(Expert.name == expert_or_id)).first()
            ):
                found = self._experiments(session, Expert.name == expert_or_id)
                if found:
                    return found[-1]
                raise NotFoundError(f"{expert_or_id} has no experiments; start one with `moea ab start`")
            if isinstance(expert_or_id, int) or str(expert_or_id).isdigit():
                found = self._experiments(session, Experiment.id == int(expert_or_id))
                if found:
                    return found[0]
            raise NotFoundError(f"no experiment or expert {expert_or_id!r}; see `moea ab list`")

    def stop_experiment(
        self, expert: str, winner: int | None = None, actor: str | None = None
    ) -> ExperimentView:
        """Stop the running experiment of `expert`; a `winner` version takes alias prod."""

        def work(session: Session) -> ExperimentView:
            self._bump(session)
            row = self._expert(session, expert, lock=True)
            experiment = self._running_experiment(session, row.id)
            if experiment is None:
                raise NotFoundError(f"no running experiment for {expert}; see `moea ab list`")
            if winner is not None:
                if winner not in {int(a["version"]) for a in experiment.arms}:
                    raise ValidationError(f"winner {winner} is not an arm of experiment {experiment.id}")
                target = self._find_version(session, Ref(row.name, version=winner), f"{expert}@{winner}")
                self._move_alias(
                    session,
                    row.id,
                    DEFAULT_ALIAS,
                    target,
                    "promote",
                    actor,
                    f"experiment {experiment.id} winner",
                )
            experiment.status, experiment.stopped_at, experiment.winner = "stopped", utcnow(), winner
            session.add(experiment)
            session.flush()
            return self._experiment_view(experiment, row.name)

        return db.run_transaction(self.engine, work)

    # ------------------------------------------------------------------------------ request log / outcomes

    def log_requests(self, records: list[RequestRecord]) -> None:
        """Insert a batch of request records in one transaction (does not change the state token)."""
        if records:
            rows = [asdict(r) for r in records]
            db.run_transaction(
                self.engine, lambda s: s.connection().execute(insert(RequestLog.__table__), rows)
            )

    def record_outcomes(self, records: list[OutcomeRecord]) -> None:
        """Insert a batch of outcomes in one transaction."""
        if records:
            rows = [asdict(r) for r in records]
            db.run_transaction(self.engine, lambda s: s.connection().execute(insert(Outcome.__table__), rows))

    def experiment_requests(self, experiment_id: int) -> list[RequestRecord]:
        """Every request logged under the experiment, in insertion order."""
        with self.engine.connect() as connection:
            rows = connection.execute(Q_EXPERIMENT_REQUESTS, {"experiment_id": experiment_id}).all()
        return [
            RequestRecord(request_id, as_utc(created_at), *rest) for request_id, created_at, *rest in rows
        ]

    def experiment_outcomes(self, experiment_id: int) -> list[OutcomeRecord]:
        """Outcomes whose request was logged under the experiment, in insertion order."""
        with self.engine.connect() as connection:
            rows = connection.execute(Q_EXPERIMENT_OUTCOMES, {"experiment_id": experiment_id}).all()
        return [
            OutcomeRecord(request_id, as_utc(created_at), reward, thumbs)
            for request_id, created_at, reward, thumbs in rows
        ]
