"""Content-addressed artifact store: every file is a sha256-named blob, every folder a tree of blobs.

Layout under the store root::

    blobs/ab/<sha256>     file contents, named by their hash; written to tmp/ first, then renamed
    views/<tree sha256>/  a materialised, read-only copy of an artifact folder (what vLLM loads)
    tmp/                  files being copied; anything here is incomplete by definition

A blob only ever appears under its final name by `os.rename` of a fully written and fsynced temp file,
so a process killed mid-copy leaves at most a temp file (removed by `gc`), never a truncated blob. The
tree hash is the sha256 of a canonical JSON manifest of (relpath, sha256, size), so one hash pins the
whole folder. Names of experts never reach the file system: every path is derived from a hash or
from a validated relative path inside a tree.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import stat
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from .errors import IntegrityError, ValidationError

CHUNK = 1 << 20
_SHA_RE = re.compile(r"^[0-9a-f]{64}$")
MAX_TREE_FILES = 10_000


@dataclass(frozen=True)
class FileEntry:
    """One file of a tree."""

    relpath: str
    sha256: str
    size: int


@dataclass(frozen=True)
class Tree:
    """A folder as stored: its files and the hash of its canonical manifest."""

    sha256: str
    files: tuple[FileEntry, ...]

    @property
    def size(self) -> int:
        return sum(entry.size for entry in self.files)


@dataclass
class GcReport:
    """What `gc` removed (or would remove, on a dry run)."""

    temp_files: list[str] = field(default_factory=list)
    blobs: list[str] = field(default_factory=list)
    views: list[str] = field(default_factory=list)
    bytes_freed: int = 0


def tree_hash(files: Iterable[FileEntry]) -> str:
    """sha256 of the canonical manifest of a folder (sorted relpaths, compact JSON)."""
    manifest = {
        "format": 1,
        "files": {
            e.relpath: {"sha256": e.sha256, "size": e.size} for e in sorted(files, key=lambda e: e.relpath)
        },
    }
    return hashlib.sha256(json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def validate_relpath(relpath: str) -> str:
    """A tree member path must stay inside its folder: relative, '/'-separated, no '..' or empty parts."""
    parts = relpath.split("/")
    if (
        not relpath
        or len(relpath) > 512
        or relpath.startswith("/")
        or "\\" in relpath
        or "\x00" in relpath
        or any(part in ("", ".", "..") for part in parts)
    ):
        raise ValidationError(
            f"invalid artifact file path {relpath[:80]!r}: must be a relative path inside the folder"
        )
    return relpath


def file_sha256(path: Path) -> str:
    """sha256 of a file's contents, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class ArtifactStore:
    """The folder that holds every registered artifact, addressed by sha256."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root).expanduser().resolve()
        self.blobs_dir = self.root / "blobs"
        self.views_dir = self.root / "views"
        self.tmp_dir = self.root / "tmp"
        # tree sha → stat signature of each view file when this process last verified it
        self._verified: dict[str, tuple[tuple[str, int, int, int], ...]] = {}

    def ensure(self) -> None:
        """Create the store folders (idempotent)."""
        for folder in (self.blobs_dir, self.views_dir, self.tmp_dir):
            folder.mkdir(parents=True, exist_ok=True)

    # ------------------------------------------------------------------ writing

    def blob_path(self, sha256: str) -> Path:
        """Where the blob with this hash lives (whether or not it exists)."""
        if not _SHA_RE.match(sha256):
            raise ValidationError(f"invalid sha256 {sha256[:80]!r}: expected 64 lowercase hex digits")
        return self.blobs_dir / sha256[:2] / sha256

    def put_stream(self, source: BinaryIO, expected_sha256: str | None = None) -> tuple[str, int]:
        """Copy a stream into the store as a blob; returns (sha256, size). Atomic: temp file, fsync, rename."""
        self.ensure()
        tmp = self.tmp_dir / f"blob-{uuid.uuid4().hex}.part"
        digest, size = hashlib.sha256(), 0
        try:
            with tmp.open("wb") as out:
                while chunk := source.read(CHUNK):
                    digest.update(chunk)
                    out.write(chunk)
                    size += len(chunk)
                out.flush()
                os.fsync(out.fileno())
            sha = digest.hexdigest()
            if expected_sha256 is not None and sha != expected_sha256:
                raise IntegrityError(
                    f"content hashes to {sha[:12]}… but was declared as {expected_sha256[:12]}…; "
                    "the source is corrupt, re-create it"
                )
            # Always replace: identical content is harmless, a damaged old blob is healed, and the fresh
            # mtime keeps `gc` from collecting a blob that a register in progress is about to reference.
            final = self.blob_path(sha)
            final.parent.mkdir(parents=True, exist_ok=True)
            os.chmod(tmp, 0o444)
            os.replace(tmp, final)
            _fsync_dir(final.parent)
            return sha, size
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()

    def put_file(self, path: Path) -> tuple[str, int]:
        """Copy one file into the store; returns (sha256, size)."""
        with path.open("rb") as handle:
            return self.put_stream(handle)

    def put_tree(self, folder: Path) -> Tree:
        """Store every regular file under `folder` (symlinks are followed, nothing else is allowed)."""
        folder = Path(folder)
        if not folder.is_dir():
            raise ValidationError(f"artifact folder {folder} does not exist or is not a directory")
        entries: list[FileEntry] = []
        for path in sorted(folder.rglob("*")):
            if path.is_dir():
                continue
            if not path.is_file():
                raise ValidationError(f"{path} is not a regular file; artifact folders may only hold files")
            relpath = validate_relpath(path.relative_to(folder).as_posix())
            sha, size = self.put_file(path)
            entries.append(FileEntry(relpath, sha, size))
            if len(entries) > MAX_TREE_FILES:
                raise ValidationError(
                    f"{folder} holds more than {MAX_TREE_FILES} files; is it really an adapter?"
                )
        if not entries:
            raise ValidationError(f"artifact folder {folder} is empty")
        return Tree(tree_hash(entries), tuple(entries))

    def missing_blobs(self, entries: Iterable[FileEntry]) -> list[FileEntry]:
        """Entries whose blob is absent or has the wrong size (cheap stat check, no hashing)."""
        missing = []
        for entry in entries:
            try:
                if self.blob_path(entry.sha256).stat().st_size != entry.size:
                    missing.append(entry)
            except FileNotFoundError:
                missing.append(entry)
        return missing

    # ------------------------------------------------------------------ reading

    def view_path(self, tree_sha256: str) -> Path:
        """The folder where this tree is materialised."""
        if not _SHA_RE.match(tree_sha256):
            raise ValidationError(f"invalid tree sha256 {tree_sha256[:80]!r}")
        return self.views_dir / tree_sha256

    def materialize(self, tree: Tree, label: str) -> Path:
        """Return a complete, verified folder for `tree`, building it from blobs if needed.

        The first call in a process hashes every file; later calls only compare stat signatures, so a
        file changed after verification is hashed again. A mismatch raises IntegrityError naming the file.
        """
        self.check_tree(tree, label)
        view = self.view_path(tree.sha256)
        if not view.exists():
            self._build_view(tree, label)
        signature = self._signature(view, tree)
        if self._verified.get(tree.sha256) == signature:
            return view
        self.verify_view(tree, label)
        self._verified[tree.sha256] = signature
        return view

    def check_tree(self, tree: Tree, label: str) -> None:
        """Raise IntegrityError unless every path is safe and the file list hashes to `tree.sha256`."""
        for entry in tree.files:
            validate_relpath(entry.relpath)
        if tree_hash(tree.files) != tree.sha256:
            raise IntegrityError(
                f"{label}: the file list recorded in the database does not hash to {tree.sha256[:12]}…; "
                "the registry database was edited by hand, restore it from a backup"
            )

    def _signature(self, view: Path, tree: Tree) -> tuple[tuple[str, int, int, int], ...]:
        signature = []
        for entry in tree.files:
            try:
                st = (view / entry.relpath).stat()
            except FileNotFoundError:
                raise IntegrityError(
                    f"{label_file(view, entry)} is missing from the store; run `moea registry verify --repair`"
                ) from None
            signature.append((entry.relpath, st.st_size, st.st_mtime_ns, st.st_ino))
        return tuple(signature)

    def _build_view(self, tree: Tree, label: str) -> None:
        self.ensure()
        staging = self.tmp_dir / f"view-{uuid.uuid4().hex}"
        try:
            for entry in tree.files:
                blob = self.blob_path(entry.sha256)
                if not blob.exists():
                    raise IntegrityError(
                        f"{label}: blob {blob} for {entry.relpath} is missing; re-register the run or import it again"
                    )
                target = staging / entry.relpath
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(blob, target)
                actual = file_sha256(target)
                if actual != entry.sha256:
                    raise IntegrityError(
                        f"{label}: blob {blob} ({entry.relpath}) hashes to {actual[:12]}…, expected "
                        f"{entry.sha256[:12]}…; the store was modified, run `moea registry verify`"
                    )
                os.chmod(target, 0o444)
            with contextlib.suppress(FileExistsError, OSError):
                os.rename(staging, self.view_path(tree.sha256))  # another process may have won the race
        finally:
            if staging.exists():
                shutil.rmtree(staging, onerror=_force_remove)

    def verify_view(self, tree: Tree, label: str) -> None:
        """Hash every file of the materialised view; raise IntegrityError naming the first bad file."""
        view = self.view_path(tree.sha256)
        for entry in tree.files:
            path = view / entry.relpath
            if not path.is_file():
                raise IntegrityError(
                    f"{label}: artifact file {path} is missing; run `moea registry verify --repair`"
                )
            actual = file_sha256(path)
            if actual != entry.sha256:
                raise IntegrityError(
                    f"{label}: artifact file {path} was modified after registration (sha256 {actual[:12]}…, "
                    f"expected {entry.sha256[:12]}…); run `moea registry verify --repair`"
                )
        expected = {entry.relpath for entry in tree.files}
        extra = sorted(p.relative_to(view).as_posix() for p in view.rglob("*") if p.is_file())
        unexpected = [p for p in extra if p not in expected]
        if unexpected:
            raise IntegrityError(
                f"{label}: unexpected file {view / unexpected[0]} in the artifact folder; "
                "run `moea registry verify --repair`"
            )

    def verify_blob(self, entry: FileEntry) -> str | None:
        """Strict check of one blob; returns a problem description or None."""
        path = self.blob_path(entry.sha256)
        if not path.is_file():
            return f"blob {path} ({entry.relpath}) is missing"
        actual = file_sha256(path)
        if actual != entry.sha256:
            return f"blob {path} ({entry.relpath}) hashes to {actual[:12]}…, expected {entry.sha256[:12]}…"
        return None

    def drop_view(self, tree_sha256: str) -> None:
        """Delete a materialised view (it is rebuilt from blobs on next use)."""
        view = self.view_path(tree_sha256)
        self._verified.pop(tree_sha256, None)
        if view.exists():
            shutil.rmtree(view, onerror=_force_remove)

    def restore_blob(self, entry: FileEntry, source: Path) -> bool:
        """Rewrite a damaged blob from a file that still has the right hash; True on success."""
        if not source.is_file() or file_sha256(source) != entry.sha256:
            return False
        blob = self.blob_path(entry.sha256)
        if blob.exists():
            os.chmod(blob, 0o644)
            blob.unlink()
        self.put_file(source)
        return True

    # ------------------------------------------------------------------ garbage collection

    def gc(
        self,
        referenced_blobs: set[str],
        referenced_trees: set[str],
        grace_s: float = 3600.0,
        dry_run: bool = False,
    ) -> GcReport:
        """Remove temp files, unreferenced blobs and views older than `grace_s` seconds.

        The grace period protects a register that has copied its blobs but not committed yet; callers
        also hold the registry's write lock while collecting, and register re-checks its blobs under
        that lock, so even `grace_s=0` cannot remove a blob a committed version points to.
        """
        report = GcReport()
        cutoff = time.time() - grace_s
        candidates: list[tuple[Path, list[str]]] = []
        if self.tmp_dir.exists():
            candidates += [(p, report.temp_files) for p in self.tmp_dir.iterdir()]
        if self.blobs_dir.exists():
            for shard in self.blobs_dir.iterdir():
                for blob in shard.iterdir() if shard.is_dir() else ():
                    if blob.name not in referenced_blobs:
                        candidates.append((blob, report.blobs))
        if self.views_dir.exists():
            candidates += [
                (v, report.views) for v in self.views_dir.iterdir() if v.name not in referenced_trees
            ]
        for path, bucket in candidates:
            try:
                st = path.lstat()
            except FileNotFoundError:
                continue
            if st.st_mtime > cutoff:
                continue
            bucket.append(str(path))
            report.bytes_freed += _tree_size(path) if path.is_dir() else st.st_size
            if not dry_run:
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path, onerror=_force_remove)
                else:
                    with contextlib.suppress(FileNotFoundError):
                        path.unlink()
        return report


def label_file(view: Path, entry: FileEntry) -> str:
    """Human-readable path of a file inside a view."""
    return str(view / entry.relpath)


def _tree_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _force_remove(func, path, _exc_info) -> None:  # type: ignore[no-untyped-def]
    """rmtree helper: views are read-only, so make the entry writable and retry once."""
    with contextlib.suppress(OSError):
        os.chmod(os.path.dirname(path), stat.S_IRWXU)
        os.chmod(path, stat.S_IRWXU)
        func(path)
