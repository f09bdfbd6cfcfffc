"""Version diffs (registry.diff).

Real database: SQLite file; PostgreSQL too with MOEA_TEST_POSTGRES=1.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import make_run_dir

from registry.service import Registry


def test_diff_reports_metrics_config_and_files(registry: Registry, tmp_path: Path) -> None:
    registry.register_run(make_run_dir(tmp_path / "a", seed=1, loss=1.0))
    registry.register_run(make_run_dir(tmp_path / "b", seed=2, loss=0.8))
    diff = registry.diff("summarize@1", "summarize@2")
    metrics = {key: (a, b) for key, a, b in diff.metrics}
    assert metrics["best_val_loss"] == (pytest.approx(1.0), pytest.approx(0.8))
    assert ("adapter.seed", 1, 2) in diff.config
    assert {path for path, _, _ in diff.files} == {"adapter_config.json", "adapter_model.safetensors"}
