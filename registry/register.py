"""Registering a run dir: each expert becomes a new immutable version, plus the router, in one transaction.

Version numbers are assigned inside the write transaction that inserts them (UNIQUE(expert, version)
backs this up); artifacts are copied into the content-addressed store *before* that transaction and
only referenced by it, so a crash at any point leaves either a complete version or none.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

from sqlalchemy import Engine, func
from sqlalchemy import select as sa_select
from sqlmodel import Session, select

from . import db
from .artifacts import artifact_row
from .errors import ValidationError
from .models import (
    Expert,
    ExpertVersion,
    RegisterResult,
    RouterExpert,
    RouterVersion,
    RouterVersionView,
    utcnow,
)
from .routers import router_view
from .rundir import ExpertPlan, RunPlan, read_run_dir
from .state import bump_state, default_actor
from .store import ArtifactStore, Tree
from .versions import latest_version_number, version_view


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
            views.append(version_view(expert_row, row, [], trees[expert.name]))
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
        parent_version=latest,
        created_at=now,
        created_by=actor,
    )
    session.add(row)
    session.flush()
    return row, expert_row


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
