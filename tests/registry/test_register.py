"""Registering run dirs (registry.register): versions, routers, artifacts, broken run dirs.

Real database: SQLite file; PostgreSQL too with MOEA_TEST_POSTGRES=1.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import make_run_dir

from registry.errors import ValidationError
from registry.service import Registry


def test_register_creates_consecutive_immutable_versions(registry: Registry, run_dir: Path) -> None:
    first = registry.register_run(run_dir)
    assert [v.ref for v in first.experts] == ["classify@1", "summarize@1"]
    assert first.router is not None and first.router.ref == "router@1"
    assert first.router.experts == {"summarize": "summarize@1", "classify": "classify@1"}
    second = registry.register_run(make_run_dir(run_dir.parent / "run2", seed=7, loss=0.5))
    assert [v.ref for v in second.experts] == ["classify@2", "summarize@2"]
    assert second.router is not None and second.router.experts["summarize"] == "summarize@2"

    v1 = registry.get_version("summarize", 1)
    assert v1.metrics["best_val_loss"] == pytest.approx(1.0)
    assert v1.system_prompt == "You summarize." and v1.task_kind == "generation"
    assert v1.parent_version is None and registry.get_version("summarize", 2).parent_version == 1
    assert v1.git_commit == "0123456789abcdef" and v1.mixture_sha256 == "cd" * 32
    assert {f.relpath for f in v1.files} == {"adapter_config.json", "adapter_model.safetensors"}
    assert v1.sha256 != registry.get_version("summarize", 2).sha256
    assert v1.created_at.tzinfo is not None
    assert [e.name for e in registry.list_experts()] == ["classify", "summarize"]
    assert registry.latest_router().version == 2  # type: ignore[union-attr]


def test_artifact_path_is_a_complete_verified_copy(registry: Registry, run_dir: Path) -> None:
    view = registry.register_run(run_dir).experts[1]
    folder = registry.artifact_path(view)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert (folder / name).read_bytes() == (run_dir / "experts" / "summarize" / name).read_bytes()
    router = registry.latest_router()
    assert router is not None
    assert json.loads((registry.router_artifact_path(router) / "router.json").read_text())["labels"]
    # The run dir can disappear: the registry owns its copy.
    (run_dir / "experts" / "summarize" / "adapter_model.safetensors").unlink()
    assert registry.artifact_path(registry.resolve("summarize@1")) == folder


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: (d / "run.json").unlink(), "run.json is missing"),
        (lambda d: (d / "run.json").write_text("{"), "not valid JSON"),
        (lambda d: (d / "run.json").write_text('{"format_version": 9}'), "format_version"),
        (lambda d: (d / "experts" / "summarize" / "adapter_model.safetensors").unlink(), "adapter_model"),
        (
            lambda d: (d / "experts" / "summarize").rename(d / "experts" / "bad name"),
            "invalid expert folder name",
        ),
    ],
)
def test_register_rejects_broken_run_dirs_without_side_effects(
    registry: Registry, run_dir: Path, mutate, message: str
) -> None:
    mutate(run_dir)
    with pytest.raises(ValidationError, match=message):
        registry.register_run(run_dir)
    assert registry.list_experts() == []
    assert not (registry.store.blobs_dir.exists() and any(registry.store.blobs_dir.iterdir()))
