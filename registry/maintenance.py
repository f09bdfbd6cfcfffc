"""Store maintenance: strict verification (with repair) of every artifact, and garbage collection."""

from __future__ import annotations

from dataclasses import dataclass, field

from sqlalchemy import Engine
from sqlmodel import Session, select

from . import db
from .artifacts import ArtifactTrees
from .models import Artifact, ArtifactFile
from .state import bump_state
from .store import ArtifactStore, GcReport, Tree


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


def verify(engine: Engine, store: ArtifactStore, trees: ArtifactTrees, repair: bool = False) -> VerifyReport:
    """Strict check: every blob re-hashed, every tree hash recomputed, every materialised view re-hashed.

    `repair` drops damaged views (rebuilt from blobs on next use) and rewrites damaged blobs from an
    intact view file when one exists.
    """
    report = VerifyReport()
    with Session(engine) as session:
        shas = session.exec(select(Artifact.sha256).order_by(Artifact.id)).all()
        artifact_trees = [trees.get(session, sha) for sha in shas]
    seen: set[str] = set()
    for tree in artifact_trees:
        report.artifacts += 1
        label = f"artifact {tree.sha256[:12]}…"
        try:
            store.check_tree(tree, label)
        except Exception as error:  # noqa: BLE001 - reported, not raised
            report.problems.append(str(error))
            continue
        _verify_blobs(store, tree, seen, report, repair)
        if store.view_path(tree.sha256).exists():
            _verify_view(store, tree, label, report, repair)
    return report


def _verify_blobs(
    store: ArtifactStore, tree: Tree, seen: set[str], report: VerifyReport, repair: bool
) -> None:
    """Re-hash each blob of `tree` not seen yet; a damaged one is restored from the view's copy on repair."""
    view = store.view_path(tree.sha256)
    for entry in tree.files:
        if entry.sha256 in seen:
            continue
        seen.add(entry.sha256)
        report.blobs += 1
        report.bytes += entry.size
        problem = store.verify_blob(entry)
        if problem:
            report.problems.append(problem)
            if repair and store.restore_blob(entry, view / entry.relpath):
                report.repaired.append(f"blob {entry.sha256[:12]}… restored from {view / entry.relpath}")


def _verify_view(store: ArtifactStore, tree: Tree, label: str, report: VerifyReport, repair: bool) -> None:
    """Re-hash the materialised view of `tree`; a damaged one is dropped on repair (rebuilt on next use)."""
    try:
        store.verify_view(tree, label)
    except Exception as error:  # noqa: BLE001 - reported, not raised
        report.problems.append(str(error))
        if repair:
            store.drop_view(tree.sha256)
            report.repaired.append(
                f"view {store.view_path(tree.sha256)} removed; it is rebuilt from blobs on next use"
            )


def gc(engine: Engine, store: ArtifactStore, grace_s: float = 3600.0, dry_run: bool = False) -> GcReport:
    """Remove temp files, unreferenced blobs and views older than `grace_s`, holding the write lock."""

    def work(session: Session) -> GcReport:
        bump_state(session)  # takes the write lock: no register can commit while we collect
        blobs = set(session.exec(select(ArtifactFile.sha256).distinct()).all())
        trees = set(session.exec(select(Artifact.sha256)).all())
        return store.gc(blobs, trees, grace_s=grace_s, dry_run=dry_run)

    return db.run_transaction(engine, work)
