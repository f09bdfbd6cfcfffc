"""Run dir states and the decisions taken from them: `moea train` (refuse, resume, start) and `moea demo`
(reuse, resume, retrain next to the current run and swap it in)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from moe_adapters import run_dir as run_dir_module
from moe_adapters.run_dir import (
    CHECKPOINT_NAME,
    RUN_MARKER,
    replace_run_dir,
    run_dir_state,
    write_json_atomic,
)
from serving.demo import plan_training, prepare_run, previous_dir, staging_dir

MIXTURE = Path(__file__).parent / "fixtures" / "mixture.yaml"


def _finished(path: Path, created_at: str = "2026-01-01T00:00:00+00:00") -> Path:
    """A finished run dir the registry accepts: one expert with a tiny (valid) adapter."""
    from safetensors.numpy import save_file

    expert = path / "experts" / "a"
    expert.mkdir(parents=True, exist_ok=True)
    (expert / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8}))
    save_file(
        {"lora_A": np.full((2, 2), len(created_at), np.float32)}, str(expert / "adapter_model.safetensors")
    )
    run = {"format_version": 1, "base_model": "base", "created_at": created_at, "tasks": {"a": {}}}
    (path / RUN_MARKER).write_text(json.dumps(run))
    return path


def _resumable(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "mixture.yaml").write_text("tasks: []\n")
    (path / CHECKPOINT_NAME).write_bytes(b"state")
    return path


def test_run_dir_state(tmp_path: Path) -> None:
    assert run_dir_state(tmp_path / "missing") == "empty"
    (tmp_path / "new").mkdir()
    assert run_dir_state(tmp_path / "new") == "empty"
    (tmp_path / "new" / "mixture.yaml").write_text("tasks: []\n")  # stopped before its first checkpoint
    assert run_dir_state(tmp_path / "new") == "partial"
    assert run_dir_state(_resumable(tmp_path / "r")) == "resumable"
    assert run_dir_state(_finished(tmp_path / "f")) == "finished"
    (tmp_path / "f" / CHECKPOINT_NAME).write_bytes(b"left over")  # stopped between marker and cleanup
    assert run_dir_state(tmp_path / "f") == "finished"


def test_write_json_atomic_replaces_whole_files_and_leaves_no_temp(tmp_path: Path) -> None:
    target = tmp_path / RUN_MARKER
    write_json_atomic(target, {"a": 1})
    write_json_atomic(target, {"a": 2})
    assert json.loads(target.read_text()) == {"a": 2}
    assert [p.name for p in tmp_path.iterdir()] == [RUN_MARKER]
    assert target.stat().st_mode & 0o777 == 0o644


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "two-renames"])
def test_replace_run_dir_keeps_the_replaced_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, exchange: bool
) -> None:
    if not exchange:  # the path taken where the OS has no atomic exchange
        monkeypatch.setattr(run_dir_module, "_exchange", lambda a, b: False)
    run, new, previous = tmp_path / "run", tmp_path / "run.retrain", tmp_path / "run.previous"
    _finished(run, "2026-01-01T00:00:00+00:00")
    _finished(new, "2026-02-01T00:00:00+00:00")
    _finished(previous, "2025-12-01T00:00:00+00:00")
    replace_run_dir(new, run, previous)
    assert json.loads((run / RUN_MARKER).read_text())["created_at"].startswith("2026-02")
    assert json.loads((previous / RUN_MARKER).read_text())["created_at"].startswith("2026-01")
    assert not new.exists()
    with pytest.raises(FileNotFoundError, match="not a finished run"):
        replace_run_dir(_resumable(new), run, previous)
    assert run_dir_state(run) == "finished"


def test_demo_plan(tmp_path: Path) -> None:
    run = tmp_path / "run"
    staging = staging_dir(run)

    def plan(retrain: bool) -> tuple[Path, bool, bool, bool]:
        p = plan_training(run, retrain)
        return p.out, p.train, p.resume, p.swap

    assert plan(False) == plan(True) == (run, True, False, False)  # first run
    _resumable(run)
    assert plan(False) == (run, True, True, False)  # an interrupted first run resumes
    assert plan(True) == (staging, True, False, True)  # --retrain starts over next to it
    (run / CHECKPOINT_NAME).unlink()
    _finished(run, "2026-01-01T00:00:00+00:00")
    assert plan(False) == (run, False, False, False)  # a second run reuses the finished run
    assert plan(True) == (staging, True, False, True)  # --retrain trains next to it, swaps it in after
    _resumable(staging)  # ... and was interrupted
    assert plan(True) == (staging, True, True, True)  # the next --retrain continues it
    assert plan(False)[:2] == (run, False)  # a plain run keeps using the current run
    assert "--retrain to continue the interrupted retrain" in plan_training(run, False).reason
    (staging / CHECKPOINT_NAME).unlink()
    _finished(staging, "2026-02-01T00:00:00+00:00")  # finished, stopped before the swap
    assert plan(False) == plan(True) == (staging, False, False, True)
    _finished(staging, "2025-12-01T00:00:00+00:00")  # older: what a swap left behind (the replaced run)
    assert plan(False) == (run, False, False, False)
    assert plan(True) == (staging, True, False, True)


def test_demo_swaps_in_a_finished_retrain_then_registers_it(tmp_path: Path) -> None:
    """What a retrain stopped between training and swap leaves: the demo swaps (no training) and registers."""
    from registry.service import Registry

    run = _finished(tmp_path / "run", "2026-01-01T00:00:00+00:00")
    _finished(staging_dir(run), "2026-02-01T00:00:00+00:00")
    url, store = f"sqlite:///{tmp_path / 'registry.db'}", tmp_path / "store"
    prepare_run(
        MIXTURE, run, False, (), {**os.environ, "MOEA_REGISTRY_URL": url, "MOEA_STORE_DIR": str(store)}
    )
    assert json.loads((run / RUN_MARKER).read_text())["created_at"].startswith("2026-02")
    assert run_dir_state(previous_dir(run)) == "finished" and not staging_dir(run).exists()
    with Registry(url, store) as registry:
        assert [v.version for v in registry.list_versions("a")] == [1]


def _moea_train(out: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "serving.cli_root", "train", str(MIXTURE), "--out", str(out), *args],
        capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip


def test_train_refuses_to_redo_a_finished_run_and_deletes_nothing(tmp_path: Path) -> None:
    run = _finished(tmp_path / "run")
    before = sorted(p.relative_to(run) for p in run.rglob("*"))
    for args in (["--resume"], []):
        done = _moea_train(run, *args)
        assert done.returncode == 1, done.stderr
        assert done.stderr.count("\n") == 1 and done.stderr.startswith("Error: "), done.stderr
        assert "already holds a finished run (run.json)" in done.stderr
        assert sorted(p.relative_to(run) for p in run.rglob("*")) == before


def test_resume_without_checkpoint_says_it_starts_fresh(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from moe_adapters.checkpoint import check_out_dir
    from moe_adapters.train_state import TrainError

    assert check_out_dir(tmp_path / "new", resume=True) == "empty"
    assert (
        capsys.readouterr().err.strip()
        == f"resume: no {CHECKPOINT_NAME} in {tmp_path / 'new'}: starting from step 0"
    )
    assert check_out_dir(tmp_path / "new", resume=False) == "empty"
    assert capsys.readouterr().err == ""
    assert check_out_dir(_resumable(tmp_path / "r"), resume=True) == "resumable"
    with pytest.raises(TrainError, match="already holds a run stopped at a checkpoint.*--resume"):
        check_out_dir(tmp_path / "r", resume=False)
