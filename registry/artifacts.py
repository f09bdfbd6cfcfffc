"""Artifact rows in the database: the link between a version and its files in the content-addressed store."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import Engine
from sqlmodel import Session, select

from .errors import NotFoundError
from .models import Artifact, ArtifactFile
from .store import ArtifactStore, FileEntry, Tree


def artifact_row(session: Session, tree: Tree, kind: str) -> Artifact:
    """The artifact row of `tree`, inserted with its file list when this content is new."""
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


class ArtifactTrees:
    """File lists of artifacts by sha256, each read once per process (artifacts are immutable)."""

    def __init__(self) -> None:
        self._cache: dict[str, Tree] = {}

    def get(self, session: Session, sha256: str) -> Tree:
        """The file list of an artifact (raises NotFoundError if this registry has no such artifact)."""
        tree = self._cache.get(sha256)
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
            self._cache[sha256] = tree
        return tree


def materialize_artifact(
    engine: Engine, store: ArtifactStore, trees: ArtifactTrees, sha256: str, label: str
) -> Path:
    """A complete, verified folder with the artifact's files (raises IntegrityError if tampered)."""
    with Session(engine) as session:
        tree = trees.get(session, sha256)
    return store.materialize(tree, label=label)
