"""Registering a run dir: each expert becomes a new immutable version, plus the router, in one transaction.

Version numbers are assigned inside the write transaction that inserts them (UNIQUE(expert, version)
backs this up); artifacts are copied into the content-addressed store *before* that transaction and
only referenced by it, so a crash at any point leaves either a complete version or none.

Registering never moves traffic (README "Registry"): plain `NAME` is served at alias `prod`, and the
same transaction that inserts an expert's first version points `prod` at it (history action `register`,
reason "first registration"). Later registrations leave `prod` where it is; only promote, rollback and
an experiment's winner move it. An expert registered before this rule (no `prod`, served at its latest
version) gets `prod` pinned to the version it was serving when its next version is registered, so that
registration does not switch its traffic either.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

from sqlalchemy import Engine, func
from sqlalchemy import select as sa_select
from sqlmodel import Session, col, select

from . import db
from .aliases import move_alias
from .artifacts import artifact_row
from .errors import ValidationError
from .models import Alias, Expert, ExpertVersion, RouterExpert, RouterVersion, utcnow
from .routers import router_view
from .rundir import ExpertPlan, RunPlan, read_run_dir
from .state import bump_state, default_actor
from .store import ArtifactStore, Tree
from .versions import DEFAULT_ALIAS, latest_version_number, version_view
from .views import RegisterResult, RouterVersionView

FIRST_REGISTRATION = "first registration"
"""Reason recorded in the alias history when an expert's first version takes `prod`."""


def register_run(
    engine: Engine, store: ArtifactStore, run_dir: Path | str, actor: str | None = None
) -> RegisterResult:
    """Record every expert of `run_dir` as a new version (and its router) in one transaction."""
    plan = read_run_dir(run_dir)
    actor = actor or default_actor()
    trees = {expert.name: store.put_tree(expert.folder) for expert in plan.experts}
    router_tree = store.put_tree(plan.router.folder) if plan.router else None

    def work(session: Session) -> RegisterResult:
        bump_state(session)
        _ensure_blobs(store, trees, router_tree, plan)
        views, version_ids = [], {}
        for expert in plan.experts:
            row, expert_row = _insert_version(session, plan, expert, trees[expert.name], actor)
            version_ids[expert.name] = row.id
            aliases = [DEFAULT_ALIAS] if keep_serving(session, expert_row, row, actor) is row else []
            views.append(version_view(expert_row, row, aliases, trees[expert.name]))
        router = None
        if plan.router and router_tree:
            router = _insert_router(session, plan, router_tree, version_ids, actor)
        return RegisterResult(experts=views, router=router)

    return db.run_transaction(engine, work, retry_conflicts=True)


def _ensure_blobs(
    store: ArtifactStore, trees: dict[str, Tree], router_tree: Tree | None, plan: RunPlan
) -> None:
    """Under the write lock: every blob we are about to reference must exist (gc may have raced us)."""
    folders = {e.name: e.folder for e in plan.experts}
    pairs = [(trees[name], folders[name]) for name in trees]
    if router_tree and plan.router:
        pairs.append((router_tree, plan.router.folder))
    for tree, folder in pairs:
        if store.missing_blobs(tree.files) and store.put_tree(folder).sha256 != tree.sha256:
            raise ValidationError(f"{folder} changed while it was being registered; register it again")


def keep_serving(session: Session, expert: Expert, new: ExpertVersion, actor: str) -> ExpertVersion | None:
    """Make sure registering `new` does not change what `NAME` serves; returns the version given `prod`.

    An expert with `prod` keeps it (None). Without `prod` (a first registration, or an expert registered
    before registering set it) `prod` goes to the version `NAME` served until now, the newest live one
    before `new`, or to `new` when nothing was servable (its first registration, or every earlier
    version archived).
    """
    if (
        session.exec(
            select(Alias.id).where(Alias.expert_id == expert.id, Alias.alias == DEFAULT_ALIAS)
        ).first()
        is not None
    ):
        return None
    served = session.exec(
        select(ExpertVersion)
        .where(ExpertVersion.expert_id == expert.id, ExpertVersion.id != new.id)
        .where(col(ExpertVersion.archived).is_(False))
        .order_by(col(ExpertVersion.version).desc())
        .limit(1)
    ).first()
    if served is None:
        reason = FIRST_REGISTRATION if new.version == 1 else f"first live version (v{new.version})"
        target = new
    else:
        reason = f"kept serving v{served.version} while registering v{new.version} (registering does not move traffic)"
        target = served
    move_alias(session, expert.id, DEFAULT_ALIAS, target, "register", actor, reason)  # type: ignore[arg-type]
    return target


def _upsert_expert(session: Session, plan: RunPlan, expert: ExpertPlan, now: datetime) -> Expert:
    """The locked expert row, created on its first registration and refreshed from the run otherwise."""
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
    return expert_row


def _insert_version(
    session: Session, plan: RunPlan, expert: ExpertPlan, tree: Tree, actor: str
) -> tuple[ExpertVersion, Expert]:
    now = utcnow()
    expert_row = _upsert_expert(session, plan, expert, now)
    latest = latest_version_number(session, expert_row.id)
    # The version it was trained from (a --dpo --from run); None when trained from the base model.
    parent = _recorded_parent(session, expert_row, expert) if expert.lineage else None
    artifact = artifact_row(session, tree, "expert")
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
        parent_version=parent,
        created_at=now,
        created_by=actor,
    )
    session.add(row)
    session.flush()
    return row, expert_row


def _recorded_parent(session: Session, expert_row: Expert, expert: ExpertPlan) -> int:
    """The parent version a derived run recorded (registry/lineage.py); it must be a version of this expert
    in this registry (a run trained from another registry cannot claim a parent here)."""
    assert expert.lineage is not None
    parent = int(expert.lineage["parent_version"])
    exists = session.exec(
        select(ExpertVersion.id).where(
            ExpertVersion.expert_id == expert_row.id, ExpertVersion.version == parent
        )
    ).first()
    if expert_row.id is None or exists is None:
        raise ValidationError(
            f"run dir says {expert.name} was trained from {expert.name}@{parent}, which this registry does not "
            "have; register it into the registry its --from version came from"
        )
    return parent


def _insert_router(
    session: Session, plan: RunPlan, tree: Tree, version_ids: dict[str, int], actor: str
) -> RouterVersionView:
    assert plan.router is not None
    latest = session.exec(sa_select(func.max(RouterVersion.version))).one()[0]
    artifact = artifact_row(session, tree, "router")
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
    return router_view(session, row, tree)
