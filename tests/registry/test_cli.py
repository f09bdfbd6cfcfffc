"""The `moea register` / `moea registry …` commands end to end through click (real SQLite + store)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from click.testing import CliRunner
from helpers import make_run_dir

from registry.cli import main
from registry.db import head_revisions


def _run(*args: str) -> str:
    result = CliRunner().invoke(main, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def _fail(*args: str) -> str:
    result = CliRunner().invoke(main, list(args), catch_exceptions=False)
    assert result.exit_code == 1, result.output
    assert result.output.count("\n") == 1 and result.output.startswith("Error: ")
    return result.output


def test_cli_lifecycle(isolated_home: Path, tmp_path: Path) -> None:
    for seed in range(2):
        output = _run("register", str(make_run_dir(tmp_path / f"run{seed}", seed=seed)))
        assert f"summarize@{seed + 1}" in output and f"router@{seed + 1}" in output
        assert ("not served" in output) == (seed == 1)  # the first registration set prod
    listing = _run("registry", "list")
    assert "summarize" in listing and "classify" in listing
    show = _run("registry", "show", "summarize")
    assert "best_val_loss" in show and "live" in show
    assert "summarize@prod → summarize@1" in _run("registry", "promote", "summarize@1", "--alias", "prod")
    _run("registry", "promote", "summarize@2", "--reason", "better loss")
    assert "summarize@prod → summarize@1" in _run("registry", "rollback", "summarize")
    history = _run("registry", "history", "summarize")
    assert "rollback" in history and "better loss" in history
    assert "--force" in _fail("registry", "archive", "summarize@1")
    assert "archived summarize@1" in _run("registry", "archive", "summarize@1", "--force")
    assert "summarize@2\t" in _run("registry", "resolve", "summarize")
    assert "best_val_loss" not in _run("registry", "diff", "summarize@1", "summarize@2")  # same losses
    assert "adapter.seed" in _run("registry", "diff", "summarize@1", "summarize@2")
    assert "router@2" in _run("registry", "routers")
    assert "ok" in _run("registry", "verify")
    assert "removed 0 partial" in _run("registry", "gc")
    assert head_revisions()[0] in _run("registry", "upgrade")  # the newest migration, whichever it is
    assert "invalid expert name" in _fail("registry", "show", "../x")
    assert "no expert named" in _fail("registry", "show", "nosuch")


def test_cli_export_import_with_explicit_url(tmp_path: Path) -> None:
    source = ["--registry-url", f"sqlite:///{tmp_path / 'a.db'}", "--store-dir", str(tmp_path / "a")]
    target = ["--registry-url", f"sqlite:///{tmp_path / 'b.db'}", "--store-dir", str(tmp_path / "b")]
    _run("register", str(make_run_dir(tmp_path / "run")), *source)
    archive = str(tmp_path / "x.tar.gz")
    assert "exported 1 version" in _run("registry", "export", "summarize@1", "-o", archive, *source)
    assert "imported summarize@1 as summarize@1" in _run("registry", "import", archive, *target)
    assert "skipped summarize@1" in _run("registry", "import", archive, *target)


def test_verify_exits_nonzero_on_damage(isolated_home: Path, tmp_path: Path) -> None:
    _run("register", str(make_run_dir(tmp_path / "run")))
    blob = next(p for p in (isolated_home / "store" / "blobs").rglob("*") if p.is_file())
    blob.chmod(0o644)
    blob.write_bytes(b"rot")
    result = CliRunner().invoke(main, ["registry", "verify"])
    assert result.exit_code == 1 and "DAMAGED" in result.output


def test_standalone_module_entry_point(isolated_home: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "registry.cli", "registry", "list"], capture_output=True, text=True
    )
    assert result.returncode == 0 and "no experts registered yet" in result.stdout
