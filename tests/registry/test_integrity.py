"""Artifact integrity: tampering is detected and named, `verify` is strict, crafted input stays in the store."""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

import pytest
from helpers import make_run_dir

from registry.errors import IntegrityError, ValidationError
from registry.service import Registry
from registry.store import ArtifactStore, FileEntry, Tree, tree_hash, validate_relpath


def _tamper(path: Path, data: bytes = b"tampered") -> None:
    os.chmod(path, 0o644)
    path.write_bytes(data)


def test_modified_view_file_fails_loading_with_the_file_named(registry: Registry, run_dir: Path) -> None:
    view = registry.register_run(run_dir).experts[1]
    folder = registry.artifact_path(view)
    target = folder / "adapter_model.safetensors"
    _tamper(target)
    fresh = Registry(registry.url, registry.store.root)  # a new process verifies on first load
    with pytest.raises(IntegrityError, match=str(target)):
        fresh.artifact_path(view)
    with pytest.raises(IntegrityError, match="adapter_model.safetensors"):
        registry.artifact_path(view)  # same process: the changed mtime/size triggers re-hashing

    report = registry.verify()
    assert not report.ok and "adapter_model.safetensors" in report.problems[0]
    repaired = registry.verify(repair=True)
    assert repaired.repaired
    assert registry.verify().ok
    assert (
        registry.artifact_path(view).joinpath("adapter_model.safetensors").read_bytes()
        == (run_dir / "experts" / "summarize" / "adapter_model.safetensors").read_bytes()
    )


def test_modified_blob_is_found_by_verify_and_repaired_from_the_view(
    registry: Registry, run_dir: Path
) -> None:
    view = registry.register_run(run_dir).experts[0]
    registry.artifact_path(view)
    blob = next(
        f for f in registry.get_version(view.name, view.version).files if f.relpath.endswith("safetensors")
    )
    _tamper(registry.store.blob_path(blob.sha256))
    report = registry.verify()
    assert not report.ok and blob.sha256[:12] in report.problems[0]
    assert registry.verify(repair=True).repaired
    assert registry.verify().ok


def test_missing_blob_and_view_fail_loudly(registry: Registry, run_dir: Path) -> None:
    view = registry.register_run(run_dir).experts[0]
    blob = registry.get_version(view.name, view.version).files[0]
    os.remove(registry.store.blob_path(blob.sha256))
    with pytest.raises(IntegrityError, match="missing"):
        Registry(registry.url, registry.store.root).artifact_path(view)


@pytest.mark.parametrize("relpath", ["../escape", "/etc/passwd", "a/../../b", "", "a//b", "./x", "a\\b"])
def test_tree_paths_cannot_escape(relpath: str, tmp_path: Path) -> None:
    with pytest.raises(ValidationError):
        validate_relpath(relpath)
    store = ArtifactStore(tmp_path / "store")
    entry = FileEntry(relpath, "0" * 64, 1)
    with pytest.raises(ValidationError):
        store.materialize(Tree(tree_hash([entry]), (entry,)), "crafted")
    assert not (tmp_path / "escape").exists()


def _tar(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


@pytest.mark.parametrize(
    "member", ["../evil", "/tmp/evil", "blobs/../../evil", "blobs/notahash", "manifest.json/x"]
)
def test_crafted_import_archive_never_writes_outside_the_store(
    registry: Registry, tmp_path: Path, member: str
) -> None:
    archive = _tar(tmp_path / "crafted.tar.gz", {member: b"payload"})
    with pytest.raises(ValidationError, match="unexpected member"):
        registry.import_archive(archive)
    assert not (tmp_path / "evil").exists() and not Path("/tmp/evil").exists()
    assert registry.list_experts() == []


def test_export_import_roundtrip_between_registries(registry: Registry, tmp_path: Path) -> None:
    for seed in range(2):
        registry.register_run(make_run_dir(tmp_path / f"run{seed}", seed=seed))
    registry.promote("summarize@1", "prod")
    archive = tmp_path / "export.tar.gz"
    manifest = registry.export(["summarize", "classify@latest"], archive)
    assert len(manifest["experts"]) == 2

    target = Registry(f"sqlite:///{tmp_path / 'target.db'}", tmp_path / "target-store")
    target.register_run(make_run_dir(tmp_path / "local", tasks=("summarize",), seed=9))
    result = target.import_archive(archive)
    assert sorted(v.ref for v in result.created) == ["classify@1", "summarize@2", "summarize@3"]
    imported = target.resolve("summarize@2")
    source = registry.resolve("summarize@1")
    assert imported.sha256 == source.sha256 and imported.metrics == source.metrics
    assert imported.tags["imported_from"]["ref"] == "summarize@1"
    assert (target.artifact_path(imported) / "adapter_model.safetensors").read_bytes() == (
        registry.artifact_path(source) / "adapter_model.safetensors"
    ).read_bytes()
    again = target.import_archive(archive)
    assert again.created == [] and len(again.skipped) == 3
    assert target.verify().ok


def test_corrupted_blob_in_archive_is_rejected(registry: Registry, run_dir: Path, tmp_path: Path) -> None:
    registry.register_run(run_dir)
    archive = tmp_path / "export.tar.gz"
    registry.export(["summarize@1"], archive)
    with tarfile.open(archive) as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar if m.isfile()}  # type: ignore[union-attr]
    blob = next(name for name in members if name.startswith("blobs/"))
    members[blob] = members[blob][:-1] + b"X"
    target = Registry(f"sqlite:///{tmp_path / 't.db'}", tmp_path / "t-store")
    with pytest.raises(IntegrityError, match="corrupt"):
        target.import_archive(_tar(tmp_path / "bad.tar.gz", members))
    assert target.list_experts() == []


def test_import_reapplies_exported_aliases_only_where_the_target_has_none(
    registry: Registry, tmp_path: Path
) -> None:
    for seed in range(3):
        registry.register_run(
            make_run_dir(tmp_path / f"run{seed}", tasks=("summarize",), router=False, seed=seed)
        )
    registry.promote("summarize@1", "prod")
    registry.promote("summarize@2", "canary")
    archive = tmp_path / "export.tar.gz"
    manifest = registry.export(["summarize"], archive)
    assert [v["aliases"] for v in manifest["experts"][0]["versions"]] == [["prod"], ["canary"], []]

    # a fresh target gets both aliases, pointing at the imported copies, with history reason "import"
    fresh = Registry(f"sqlite:///{tmp_path / 'fresh.db'}", tmp_path / "fresh-store")
    result = fresh.import_archive(archive, actor="importer")
    assert sorted(result.aliases) == [("summarize", "canary", 2), ("summarize", "prod", 1)]
    assert {v.version: v.aliases for v in result.created} == {1: ["prod"], 2: ["canary"], 3: []}
    assert fresh.resolve("summarize").sha256 == registry.resolve("summarize@prod").sha256
    assert fresh.resolve("summarize@canary").sha256 == registry.resolve("summarize@canary").sha256
    events = fresh.history("summarize")
    assert {(e.alias, e.action, e.from_version, e.to_version, e.reason, e.actor) for e in events} == {
        ("prod", "promote", None, 1, "import", "importer"),
        ("canary", "promote", None, 2, "import", "importer"),
    }

    # an alias the target already has is never moved; a missing one is set on content already present
    fresh.promote("summarize@3", "prod")
    fresh.remove_alias("summarize", "canary")
    again = fresh.import_archive(archive)
    assert again.created == [] and again.aliases == [("summarize", "canary", 2)]
    assert fresh.resolve("summarize@prod").version == 3
    assert fresh.history("summarize")[-1].reason == "import"

    # a target whose own version holds prod keeps it; the imported versions get new numbers
    local = Registry(f"sqlite:///{tmp_path / 'local.db'}", tmp_path / "local-store")
    local.register_run(make_run_dir(tmp_path / "local", tasks=("summarize",), router=False, seed=9))
    local.promote("summarize@1", "prod")
    result = local.import_archive(archive)
    assert result.aliases == [("summarize", "canary", 3)]
    assert local.resolve("summarize").version == 1 and local.resolve("summarize@canary").version == 3


def test_import_rejects_invalid_alias_in_manifest(registry: Registry, run_dir: Path, tmp_path: Path) -> None:
    registry.register_run(run_dir)
    registry.promote("summarize@1", "prod")
    archive = tmp_path / "export.tar.gz"
    registry.export(["summarize@1"], archive)
    with tarfile.open(archive) as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar if m.isfile()}  # type: ignore[union-attr]
    members["manifest.json"] = members["manifest.json"].replace(b'"prod"', b'"../Evil"')
    target = Registry(f"sqlite:///{tmp_path / 't.db'}", tmp_path / "t-store")
    with pytest.raises(ValidationError, match="invalid alias"):
        target.import_archive(_tar(tmp_path / "bad.tar.gz", members))
    assert target.list_experts() == []
