"""Registry operations on a real database (SQLite file; PostgreSQL too with MOEA_TEST_POSTGRES=1)."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import pytest
from helpers import make_run_dir

from registry.errors import ConflictError, NotFoundError, ValidationError
from registry.models import OutcomeRecord, RequestRecord
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
    ("ref", "expected"),
    [
        ("summarize", 2),  # no prod alias yet → latest live version
        ("summarize@latest", 3),
        ("summarize@1", 1),
        ("summarize@v1", 1),
        ("summarize@prod", 2),
        ("summarize@canary", 3),
    ],
)
def test_resolve_references(registry: Registry, tmp_path: Path, ref: str, expected: int) -> None:
    for seed in range(3):
        registry.register_run(make_run_dir(tmp_path / f"run{seed}", seed=seed))
    if ref != "summarize":
        registry.promote("summarize@2", "prod")
        registry.promote("summarize@3", "canary")
    else:
        registry.archive("summarize@3")
    assert registry.resolve(ref).version == expected


def test_resolve_name_prefers_prod_over_latest(registry: Registry, tmp_path: Path) -> None:
    for seed in range(2):
        registry.register_run(make_run_dir(tmp_path / f"run{seed}", seed=seed))
    assert registry.resolve("summarize").version == 2
    registry.promote("summarize@1", "prod")
    view = registry.resolve("summarize")
    assert (view.version, view.aliases) == (1, ["prod"])


@pytest.mark.parametrize(
    ("ref", "error"),
    [
        ("nosuch", NotFoundError),
        ("summarize@9", NotFoundError),
        ("summarize@staging", NotFoundError),
        ("summarize@0", ValidationError),
        ("../etc/passwd", ValidationError),
        ("a/b", ValidationError),
        ("x" * 65, ValidationError),
        ("", ValidationError),
        ("summarize@Prod!", ValidationError),
    ],
)
def test_resolve_errors_are_one_line_and_typed(
    registry: Registry, run_dir: Path, ref: str, error: type
) -> None:
    registry.register_run(run_dir)
    with pytest.raises(error) as caught:
        registry.resolve(ref)
    assert "\n" not in str(caught.value)


def test_promote_rollback_history(registry: Registry, tmp_path: Path) -> None:
    for seed in range(3):
        registry.register_run(make_run_dir(tmp_path / f"run{seed}", seed=seed))
    registry.promote("summarize@1", "prod", actor="alice", reason="first")
    registry.promote("summarize@2", "prod", actor="bob")
    registry.promote("summarize@3", "prod", actor="carol")
    assert registry.rollback("summarize", "prod").version == 2
    assert registry.rollback("summarize", "prod").version == 1
    with pytest.raises(ConflictError, match="no previous holder"):
        registry.rollback("summarize", "prod")
    assert registry.resolve("summarize@prod").version == 1
    history = registry.history("summarize")
    assert [(e.action, e.from_version, e.to_version) for e in history] == [
        ("promote", None, 1),
        ("promote", 1, 2),
        ("promote", 2, 3),
        ("rollback", 3, 2),
        ("rollback", 2, 1),
    ]
    assert history[0].actor == "alice" and history[0].reason == "first"
    # Only one version ever holds an alias.
    assert [v.version for v in registry.list_versions("summarize") if "prod" in v.aliases] == [1]


def test_archive_requires_force_for_aliased_version(registry: Registry, tmp_path: Path) -> None:
    for seed in range(2):
        registry.register_run(make_run_dir(tmp_path / f"run{seed}", seed=seed))
    registry.promote("summarize@2", "prod")
    with pytest.raises(ConflictError, match="--force"):
        registry.archive("summarize@2")
    registry.archive("summarize@2", force=True)
    assert registry.get_version("summarize", 2).archived
    with pytest.raises(NotFoundError, match="archived"):
        registry.resolve("summarize@2")
    assert registry.resolve("summarize").version == 1  # alias gone → latest live
    assert registry.history("summarize")[-1].action == "remove"
    with pytest.raises(ConflictError, match="archived"):
        registry.promote("summarize@2", "prod")
    registry.restore("summarize@2")
    assert registry.resolve("summarize@latest").version == 2
    with pytest.raises(ValidationError):
        registry.archive("summarize")


def test_state_token_changes_only_on_serving_changes(registry: Registry, run_dir: Path) -> None:
    tokens = [registry.state_token()]
    registry.register_run(run_dir)
    tokens.append(registry.state_token())
    registry.promote("summarize@1", "prod")
    tokens.append(registry.state_token())
    assert len(set(tokens)) == 3
    registry.resolve("summarize")
    registry.log_requests([_request("r0", None)])
    assert registry.state_token() == tokens[-1]


def test_diff_reports_metrics_config_and_files(registry: Registry, tmp_path: Path) -> None:
    registry.register_run(make_run_dir(tmp_path / "a", seed=1, loss=1.0))
    registry.register_run(make_run_dir(tmp_path / "b", seed=2, loss=0.8))
    diff = registry.diff("summarize@1", "summarize@2")
    metrics = {key: (a, b) for key, a, b in diff.metrics}
    assert metrics["best_val_loss"] == (pytest.approx(1.0), pytest.approx(0.8))
    assert ("adapter.seed", 1, 2) in diff.config
    assert {path for path, _, _ in diff.files} == {"adapter_config.json", "adapter_model.safetensors"}


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


def _request(
    request_id: str, experiment_id: int | None, version: int | None = 1, shadow: bool = False
) -> RequestRecord:
    return RequestRecord(
        request_id=request_id,
        created_at=datetime.now(UTC),
        expert="summarize",
        version=version,
        experiment_id=experiment_id,
        user="u1",
        routed=True,
        latency_ms=12.5,
        prompt_tokens=5,
        completion_tokens=7,
        status_code=200,
        shadow=shadow,
    )


def test_experiments_requests_and_outcomes(registry: Registry, tmp_path: Path) -> None:
    for seed in range(3):
        registry.register_run(make_run_dir(tmp_path / f"run{seed}", seed=seed))
    experiment = registry.start_experiment(
        "summarize", [(1, 0.5), (2, 0.5)], metric="thumbs", shadow_version=3
    )
    assert (experiment.status, [a.version for a in experiment.arms], experiment.shadow_version) == (
        "running",
        [1, 2],
        3,
    )
    assert registry.active_experiment("summarize") == experiment
    assert registry.active_experiments() == [experiment]
    with pytest.raises(ConflictError, match="already running"):
        registry.start_experiment("summarize", [(1, 1.0)])
    with pytest.raises(ConflictError, match="running experiment"):
        registry.archive("summarize@2")

    registry.log_requests(
        [
            _request("a", experiment.id, 1),
            _request("b", experiment.id, 2),
            _request("b", experiment.id, 3, shadow=True),
            _request("c", None),
        ]
    )
    registry.record_outcomes(
        [
            OutcomeRecord("a", datetime.now(UTC), thumbs=True),
            OutcomeRecord("b", datetime.now(UTC), reward=0.25),
            OutcomeRecord("c", datetime.now(UTC), thumbs=False),
        ]
    )
    requests = registry.experiment_requests(experiment.id)
    assert [(r.request_id, r.version, r.shadow) for r in requests] == [
        ("a", 1, False),
        ("b", 2, False),
        ("b", 3, True),
    ]
    assert requests[0].latency_ms == 12.5 and requests[0].created_at.tzinfo is not None
    outcomes = registry.experiment_outcomes(experiment.id)
    assert [(o.request_id, o.thumbs, o.reward) for o in outcomes] == [("a", True, None), ("b", None, 0.25)]

    stopped = registry.stop_experiment("summarize", winner=2)
    assert (stopped.status, stopped.winner) == ("stopped", 2) and stopped.stopped_at is not None
    assert registry.resolve("summarize@prod").version == 2
    assert registry.history("summarize")[-1].reason == f"experiment {experiment.id} winner"
    assert registry.active_experiment("summarize") is None
    assert registry.get_experiment("summarize") == stopped == registry.get_experiment(experiment.id)
    assert registry.list_experiments("summarize") == [stopped]


@pytest.mark.parametrize(
    ("arms", "kwargs", "error"),
    [
        ([], {}, ValidationError),
        ([(1, 0.0)], {}, ValidationError),
        ([(1, 1.0), (1, 1.0)], {}, ValidationError),
        ([(1, 1.0)], {"metric": "clicks"}, ValidationError),
        ([(1, 1.0)], {"shadow_version": 1}, ValidationError),
        ([(9, 1.0)], {}, NotFoundError),
    ],
)
def test_experiment_validation(registry: Registry, run_dir: Path, arms, kwargs, error: type) -> None:
    registry.register_run(run_dir)
    with pytest.raises(error):
        registry.start_experiment("summarize", arms, **kwargs)
    assert registry.active_experiments() == []


def test_core_read_paths_return_the_same_views_as_the_orm(registry: Registry, tmp_path: Path) -> None:
    """resolve / latest_router / experiment reads use Core statements; their views must equal the ORM-built ones."""
    for seed in range(4):
        registry.register_run(make_run_dir(tmp_path / f"run{seed}", seed=seed))
    registry.promote("summarize@2", "prod")
    registry.promote("summarize@2", "canary")
    registry.archive("summarize@4")
    orm = {v.version: v for v in registry.list_versions("summarize")}  # built from ORM rows
    for ref, version in [
        ("summarize", 2),
        ("summarize@prod", 2),
        ("summarize@canary", 2),
        ("summarize@latest", 3),
        ("summarize@1", 1),
        ("classify", 4),
    ]:
        name = ref.partition("@")[0]
        expected = orm[version] if name == "summarize" else registry.list_versions(name)[version - 1]
        assert registry.resolve(ref) == expected, ref
    assert registry.resolve("summarize@2").aliases == ["canary", "prod"]
    assert registry.resolve("summarize@4", include_archived=True) == orm[4]
    with pytest.raises(NotFoundError, match="archived"):
        registry.resolve("summarize@4")
    registry.remove_alias("summarize", "prod")  # `name` falls back to the newest live version
    assert registry.resolve("summarize").version == 3

    assert registry.latest_router() == registry.list_routers()[-1]
    assert registry.latest_router().experts == {"summarize": "summarize@4", "classify": "classify@4"}  # type: ignore[union-attr]

    experiment = registry.start_experiment("summarize", [(1, 1.0), (2, 1.0)])
    records = [_request(f"r{i}", experiment.id, 1 + i % 2, shadow=i == 3) for i in range(5)]
    registry.log_requests(records)
    outcomes = [OutcomeRecord(f"r{i}", datetime.now(UTC), reward=i / 4, thumbs=i % 2 == 0) for i in range(5)]
    registry.record_outcomes(outcomes)
    assert registry.experiment_requests(experiment.id) == records
    assert registry.experiment_outcomes(experiment.id) == outcomes
    assert registry.experiment_requests(experiment.id + 1) == []
