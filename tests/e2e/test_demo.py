"""`moea demo`, the README's headline command, on the example mixture cut down by `--set` to a few tiny
steps: the real pipeline (train → register → serve with vLLM → examples/client.py) once, then the
second-run paths without a server: reuse the run as version 2, and `--retrain` as version 3.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from serving.demo import REPO_EXAMPLES, prepare_run, previous_dir, staging_dir

pytestmark = pytest.mark.slow

TASKS = ("sentiment", "math", "extraction", "dates")
# Quality is not the point here, wiring is: 8 steps of 2 rows, one eval at the end, a training-free router.
TINY = (
    "train.max_steps=8", "train.batch_size=2", "train.eval_every=0", "train.eval_batches=1",
    "train.checkpoint_every=0", "train.log_every=4",
    "router.encoder=minilm", "router.heads=[centroid]", "router.max_train_per_task=40",
)  # fmt: skip


def _created_at(run_dir: Path) -> str:
    return json.loads((run_dir / "run.json").read_text())["created_at"]


def _versions(workdir: Path) -> dict[str, list[int]]:
    from registry.service import Registry

    with Registry(f"sqlite:///{workdir / 'registry.db'}", workdir / "store") as registry:
        return {task: [v.version for v in registry.list_versions(task)] for task in TASKS}


def _served(workdir: Path) -> dict[str, int]:
    from registry.service import Registry

    with Registry(f"sqlite:///{workdir / 'registry.db'}", workdir / "store") as registry:
        return {task: registry.resolve(task).version for task in TASKS}


def test_demo_serves_every_expert_then_reuses_and_retrains(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    workdir = tmp_path / "demo"
    sets = [arg for pair in TINY for arg in ("--set", pair)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    demo = [sys.executable, "-m", "serving.cli_root", "demo", "--workdir", str(workdir), "--per-task", "1"]
    done = subprocess.run([*demo, *sets], env=env, capture_output=True, text=True, timeout=900)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-6000:]
    assert f"[1/4] training experts into {workdir / 'run'}" in done.stdout
    models = json.loads(re.search(r"^models: (.*)$", done.stdout, re.M).group(1))
    assert {"moe", *TASKS} <= set(models)
    for task in TASKS:  # asked by name (and pinned), each expert answered itself
        assert re.search(rf"^\[{task}\s+→ {task}@1\s*\]", done.stdout, re.M), done.stdout[-4000:]
        assert re.search(rf"^\[{task}@1\s+→ {task}@1\s*\]", done.stdout, re.M)
    assert "routing accuracy" in done.stdout
    assert done.stdout.rstrip().endswith("demo finished")
    assert _versions(workdir) == {task: [1] for task in TASKS}

    # A second run reuses the finished run and registers it as version 2 (serving is covered above).
    run_dir = workdir / "run"
    first = _created_at(run_dir)
    child_env = {**env, "MOEA_REGISTRY_URL": f"sqlite:///{workdir / 'registry.db'}",
                 "MOEA_STORE_DIR": str(workdir / "store")}  # fmt: skip
    capfd.readouterr()
    prepare_run(REPO_EXAMPLES / "mixture.yaml", run_dir, False, TINY, child_env)
    assert "[1/4] reusing the finished run" in capfd.readouterr().out
    assert _created_at(run_dir) == first
    assert _versions(workdir) == {task: [1, 2] for task in TASKS}
    assert _served(workdir) == {task: 1 for task in TASKS}  # registering moved no traffic

    # --retrain trains a new run next to it, swaps it in once finished, and registers version 3.
    prepare_run(REPO_EXAMPLES / "mixture.yaml", run_dir, True, TINY, child_env)
    assert f"[1/4] training a new run in {staging_dir(run_dir)}" in capfd.readouterr().out
    assert _created_at(run_dir) > first
    assert _created_at(previous_dir(run_dir)) == first
    assert not staging_dir(run_dir).exists()
    assert _versions(workdir) == {task: [1, 2, 3] for task in TASKS}
    assert _served(workdir) == {task: 3 for task in TASKS}  # the demo promotes what it retrained
