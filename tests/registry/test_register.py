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
    # Both were trained from the base: no parent (the previous version is not a lineage).
    assert v1.parent_version is None and registry.get_version("summarize", 2).parent_version is None
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


def _moves(registry: Registry, name: str) -> list[tuple[str, int | None, int | None, str]]:
    return [(e.action, e.from_version, e.to_version, e.reason) for e in registry.history(name, "prod")]


def test_first_registration_sets_prod_and_later_registrations_move_no_traffic(
    registry: Registry, run_dir: Path, tmp_path: Path
) -> None:
    first = registry.register_run(run_dir)
    assert [(v.ref, v.aliases) for v in first.experts] == [
        ("classify@1", ["prod"]),
        ("summarize@1", ["prod"]),
    ]
    assert _moves(registry, "summarize") == [("register", None, 1, "first registration")]

    token = registry.state_token()
    second = registry.register_run(
        make_run_dir(tmp_path / "run2", ("summarize", "classify", "extract"), seed=7)
    )
    assert registry.state_token() != token  # a new version exists, but serving resolution is unchanged:
    assert [(v.ref, v.aliases) for v in second.experts] == [
        ("classify@2", []),
        ("extract@1", ["prod"]),  # an expert new in this run: its first registration
        ("summarize@2", []),
    ]
    assert registry.resolve("summarize").ref == "summarize@1"
    assert registry.resolve("summarize@prod").ref == "summarize@1"
    assert registry.resolve("summarize@latest").ref == "summarize@2"
    assert _moves(registry, "summarize") == [("register", None, 1, "first registration")]
    assert {e.name: e.aliases for e in registry.list_experts()}["summarize"] == {"prod": 1}

    registry.promote("summarize@2", reason="better loss")  # only promote/rollback/experiments move it
    assert registry.resolve("summarize").ref == "summarize@2"
    assert _moves(registry, "summarize")[-1] == ("promote", 1, 2, "better loss")
    registry.register_run(make_run_dir(tmp_path / "run3", seed=8))
    assert registry.resolve("summarize").ref == "summarize@2"
    assert registry.rollback("summarize").ref == "summarize@1"


def test_registering_an_expert_without_prod_pins_prod_to_what_it_served(
    registry: Registry, run_dir: Path, tmp_path: Path
) -> None:
    """Experts registered before registering set prod (or whose prod was removed) are served at their
    latest version; their next registration pins prod there instead of switching their traffic."""
    for seed in range(2):
        registry.register_run(make_run_dir(tmp_path / f"run{seed}", seed=seed))
    registry.remove_alias("summarize", "prod")
    assert registry.resolve("summarize").ref == "summarize@2"  # no prod: latest, as before
    registry.register_run(make_run_dir(tmp_path / "run2", seed=2))
    assert registry.resolve("summarize").ref == "summarize@2"
    action, from_version, to_version, reason = _moves(registry, "summarize")[-1]
    assert (action, from_version, to_version) == ("register", None, 2)
    assert "kept serving v2 while registering v3" in reason


def test_registering_after_every_version_was_archived_serves_the_new_one(
    registry: Registry, run_dir: Path, tmp_path: Path
) -> None:
    registry.register_run(run_dir)
    registry.archive("summarize@1", force=True)  # removes prod; nothing is servable
    registry.register_run(make_run_dir(tmp_path / "run2", seed=3))
    assert registry.resolve("summarize").ref == "summarize@2"
    assert _moves(registry, "summarize")[-1] == ("register", None, 2, "first live version (v2)")
