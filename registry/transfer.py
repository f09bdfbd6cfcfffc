"""Move expert versions between registries: a tar.gz holding `manifest.json` and `blobs/<sha256>`.

Export writes every selected version's metadata and file list into the manifest and each referenced
blob once. Import trusts nothing in the archive: member names must be exactly `manifest.json` or
`blobs/<64 hex>` (so a crafted archive cannot write outside the store), every blob is re-hashed while
it is copied, every tree hash is recomputed from its file list, and all versions are then recorded in
one transaction with new version numbers (the source ref is kept in `tags.imported_from`). A version
whose content (sha256) the target expert already has is skipped, so importing twice is harmless.

Aliases travel too: each version entry lists the aliases it held at export time. Import re-applies an
alias only when the target expert has no alias of that name yet (it never moves an existing alias), to
the imported version or, when that content was skipped, to the newest live target version with the
same sha256; the move is recorded in the alias history with reason "import". Archives written before
aliases were exported simply carry none.
"""

from __future__ import annotations

import io
import json
import re
import tarfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from sqlalchemy import Engine
from sqlmodel import Session, col, select

from . import db
from .aliases import move_alias
from .artifacts import ArtifactTrees, artifact_row
from .catalog import get_version, list_experts, list_versions, resolve
from .errors import IntegrityError, ValidationError
from .models import Alias, Expert, ExpertVersion, as_utc, parse_ref, utcnow, validate_alias, validate_name
from .state import bump_state, default_actor
from .store import ArtifactStore, FileEntry, Tree, file_sha256, tree_hash, validate_relpath
from .versions import latest_version_number, version_view
from .views import ExpertVersionView

EXPORT_FORMAT = "moea-registry-export"
EXPORT_FORMAT_VERSION = 1
_BLOB_MEMBER = re.compile(r"^blobs/([0-9a-f]{64})$")
MAX_MANIFEST_BYTES = 64 << 20


IMPORT_REASON = "import"


@dataclass
class ImportResult:
    """What an import did.

    `created`: new versions; `skipped`: source refs whose content the target already had;
    `aliases`: `(name, alias, target version)` for every alias the import set.
    """

    created: list[ExpertVersionView] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    aliases: list[tuple[str, str, int]] = field(default_factory=list)


def export_versions(
    engine: Engine, store: ArtifactStore, trees: ArtifactTrees, refs: list[str], out_path: Path
) -> dict[str, Any]:
    """Write the versions named by `refs` (`name` = every live version, `name@v`/`name@alias` = one)."""
    selected: dict[str, list[ExpertVersionView]] = {}
    for ref in refs:
        parsed = parse_ref(ref)
        if "@" in ref:
            view = resolve(engine, ref, include_archived=True)
            views = [get_version(engine, trees, view.name, view.version)]
        else:
            views = [
                get_version(engine, trees, v.name, v.version)
                for v in list_versions(engine, parsed.name, False)
            ]
        bucket = selected.setdefault(parsed.name, [])
        bucket.extend(v for v in views if v.version not in {b.version for b in bucket})
    experts = {e.name: e for e in list_experts(engine)}
    manifest = {
        "format": EXPORT_FORMAT,
        "format_version": EXPORT_FORMAT_VERSION,
        "exported_at": utcnow().isoformat(),
        "experts": [
            {
                "name": name,
                "description": experts[name].description,
                "task_kind": experts[name].task_kind,
                "base_model": experts[name].base_model,
                "base_model_sha256": experts[name].base_model_sha256,
                "versions": [_version_entry(v) for v in sorted(views, key=lambda v: v.version)],
            }
            for name, views in selected.items()
        ],
    }
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    partial = out_path.with_name(out_path.name + ".part")
    blobs = {f.sha256: f for views in selected.values() for v in views for f in v.files}
    with tarfile.open(partial, "w:gz") as tar:
        _add_bytes(tar, "manifest.json", json.dumps(manifest, indent=1, sort_keys=True).encode())
        for sha, entry in sorted(blobs.items()):
            path = store.blob_path(sha)
            if not path.is_file() or file_sha256(path) != sha:
                raise IntegrityError(
                    f"blob {path} ({entry.relpath}) is missing or damaged; run `moea registry verify`"
                )
            tar.add(str(path), arcname=f"blobs/{sha}", recursive=False)
    partial.replace(out_path)
    return manifest


def _version_entry(view: ExpertVersionView) -> dict[str, Any]:
    return {
        "version": view.version,
        "sha256": view.sha256,
        "base_model": view.base_model,
        "base_model_name": view.base_model_name,
        "base_model_sha256": view.base_model_sha256,
        "metrics": view.metrics,
        "config": view.config,
        "tags": view.tags,
        "run_dir": view.run_dir,
        "mixture_sha256": view.mixture_sha256,
        "git_commit": view.git_commit,
        "parent_version": view.parent_version,
        "created_at": view.created_at.isoformat(),
        "created_by": view.created_by,
        "aliases": sorted(view.aliases),
        "files": [{"relpath": f.relpath, "sha256": f.sha256, "size": f.size} for f in view.files],
    }


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), int(time.time()), 0o644
    tar.addfile(info, io.BytesIO(data))


def _read_archive(store: ArtifactStore, path: Path) -> dict[str, Any]:
    """Copy every blob into the store (hash-checked) and return the manifest; reject any other member."""
    manifest: dict[str, Any] | None = None
    try:
        with tarfile.open(path, "r:*") as tar:
            for member in tar:
                if member.name == "manifest.json" and member.isfile():
                    if member.size > MAX_MANIFEST_BYTES:
                        raise ValidationError(
                            f"{path}: manifest.json is larger than {MAX_MANIFEST_BYTES >> 20} MiB"
                        )
                    manifest = json.loads(tar.extractfile(member).read())  # type: ignore[union-attr]
                    continue
                match = _BLOB_MEMBER.match(member.name)
                if member.isdir() and member.name.rstrip("/") == "blobs":
                    continue
                if not match or not member.isfile():
                    raise ValidationError(
                        f"{path}: unexpected member {member.name[:100]!r}; an export holds only manifest.json "
                        "and blobs/<sha256>"
                    )
                try:
                    store.put_stream(tar.extractfile(member), expected_sha256=match.group(1))  # type: ignore[arg-type]
                except IntegrityError as error:
                    raise IntegrityError(f"{path}: {member.name} is corrupt: {error}") from None
    except (tarfile.TarError, OSError, json.JSONDecodeError) as error:
        raise ValidationError(
            f"{path} is not a readable moea export ({error}); re-run `moea registry export`"
        ) from None
    if not isinstance(manifest, dict) or manifest.get("format") != EXPORT_FORMAT:
        raise ValidationError(f"{path} has no moea export manifest; create it with `moea registry export`")
    if manifest.get("format_version") != EXPORT_FORMAT_VERSION:
        raise ValidationError(
            f"{path} is export format_version {manifest.get('format_version')!r}; this moea reads 1"
        )
    return manifest


def _version_trees(store: ArtifactStore, manifest: dict[str, Any], path: Path) -> dict[tuple[str, int], Tree]:
    """Validate names, file paths and hashes of every version in the manifest."""
    trees = {}
    for expert in manifest.get("experts") or []:
        name = validate_name(str(expert.get("name")))
        for version in expert.get("versions") or []:
            entries = tuple(
                FileEntry(validate_relpath(str(f["relpath"])), str(f["sha256"]), int(f["size"]))
                for f in version.get("files") or []
            )
            if not entries or tree_hash(entries) != version.get("sha256"):
                raise IntegrityError(
                    f"{path}: file list of {name}@{version.get('version')} does not match its sha256"
                )
            missing = store.missing_blobs(entries)
            if missing:
                raise IntegrityError(
                    f"{path}: blob for {name}@{version.get('version')}/{missing[0].relpath} is missing"
                )
            aliases = version.get("aliases") or []
            if not isinstance(aliases, list):
                raise ValidationError(f"{path}: aliases of {name}@{version.get('version')} must be a list")
            for alias in aliases:
                validate_alias(alias)
            trees[(name, int(version["version"]))] = Tree(str(version["sha256"]), entries)
    return trees


def import_archive(
    engine: Engine, store: ArtifactStore, path: Path, actor: str | None = None
) -> ImportResult:
    """Import an export tarball into the registry at `engine` in one transaction (see module docstring)."""
    path = Path(path)
    manifest = _read_archive(store, path)
    trees = _version_trees(store, manifest, path)
    actor = actor or default_actor()

    def work(session: Session) -> ImportResult:
        bump_state(session)
        result = ImportResult()
        for expert in manifest.get("experts") or []:
            row = session.exec(select(Expert).where(Expert.name == expert["name"]).with_for_update()).first()
            if row is None:
                row = Expert(
                    name=expert["name"],
                    description=str(expert.get("description") or ""),
                    task_kind=str(expert.get("task_kind") or "generation"),
                    base_model=str(expert.get("base_model") or ""),
                    base_model_sha256=expert.get("base_model_sha256"),
                )
                session.add(row)
                session.flush()
            present = set(
                session.exec(select(ExpertVersion.sha256).where(ExpertVersion.expert_id == row.id)).all()
            )
            wanted: dict[str, str] = {}  # alias → sha256 of the version that held it in the source
            for version in expert.get("versions") or []:
                for alias in version.get("aliases") or []:
                    wanted[alias] = version["sha256"]
                source_ref = f"{row.name}@{version['version']}"
                if version["sha256"] in present:
                    result.skipped.append(source_ref)
                    continue
                tree = trees[(row.name, int(version["version"]))]
                created = _insert_imported(session, row, version, tree, source_ref, actor)
                present.add(created.sha256)
                result.created.append(version_view(row, created, [], tree))
            result.aliases.extend(_apply_aliases(session, row, wanted, actor))
        if result.aliases:  # the created views were built before their aliases existed
            held: dict[tuple[str, int], list[str]] = {}
            for name, alias, version in result.aliases:
                held.setdefault((name, version), []).append(alias)
            result.created = [
                replace(view, aliases=sorted(held.get((view.name, view.version), [])))
                for view in result.created
            ]
        return result

    return db.run_transaction(engine, work, retry_conflicts=True)


def _apply_aliases(
    session: Session, expert: Expert, wanted: dict[str, str], actor: str
) -> list[tuple[str, str, int]]:
    """Point each alias in `wanted` (alias → sha256) at the target's version with that content.

    Only aliases the target expert does not have yet are set; an archived or missing target is skipped.
    """
    if not wanted:
        return []
    existing = set(session.exec(select(Alias.alias).where(Alias.expert_id == expert.id)).all())
    applied = []
    for alias, sha256 in sorted(wanted.items()):
        if alias in existing:
            continue
        target = session.exec(
            select(ExpertVersion)
            .where(ExpertVersion.expert_id == expert.id, ExpertVersion.sha256 == sha256)
            .where(col(ExpertVersion.archived).is_(False))
            .order_by(col(ExpertVersion.version).desc())
            .limit(1)
        ).first()
        if target is None:
            continue
        move_alias(session, expert.id, alias, target, "promote", actor, IMPORT_REASON)  # type: ignore[arg-type]
        applied.append((expert.name, alias, target.version))
    return applied


def _insert_imported(
    session: Session,
    expert: Expert,
    version: dict[str, Any],
    tree: Tree,
    source_ref: str,
    actor: str,
) -> ExpertVersion:
    latest = latest_version_number(session, expert.id)
    artifact = artifact_row(session, tree, "expert")
    tags = dict(version.get("tags") or {})
    tags["imported_from"] = {
        "ref": source_ref,
        "created_at": version.get("created_at"),
        "created_by": version.get("created_by"),
    }
    row = ExpertVersion(
        expert_id=expert.id,
        version=(latest or 0) + 1,
        artifact_id=artifact.id,
        sha256=tree.sha256,
        base_model=str(version.get("base_model") or ""),
        base_model_name=version.get("base_model_name"),
        base_model_sha256=version.get("base_model_sha256"),
        metrics=dict(version.get("metrics") or {}),
        config=dict(version.get("config") or {}),
        tags=tags,
        run_dir=version.get("run_dir"),
        mixture_sha256=version.get("mixture_sha256"),
        git_commit=version.get("git_commit"),
        parent_version=None,  # a lineage's version numbers belong to the source registry
        created_at=utcnow(),
        created_by=actor,
    )
    session.add(row)
    session.flush()
    row.created_at = as_utc(row.created_at)  # type: ignore[assignment]
    return row
