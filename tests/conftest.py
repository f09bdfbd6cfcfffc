"""Shared test setup: offline hub, an isolated registry per test, the shared base-model cache."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# No model hub at run time: everything loads from local folders.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def registry_url(tmp_path: Path) -> str:
    """A fresh SQLite registry file for one test."""
    return f"sqlite:///{tmp_path / 'registry.db'}"


@pytest.fixture
def isolated_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """MOEA_HOME for registry/store state of one test; the converted base model stays shared."""
    home = tmp_path / "moea-home"
    home.mkdir()
    monkeypatch.setenv("MOEA_REGISTRY_URL", f"sqlite:///{home / 'registry.db'}")
    monkeypatch.setenv("MOEA_STORE_DIR", str(home / "store"))
    return home
