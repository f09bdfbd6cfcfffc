"""Guarantees under real concurrency and real crashes: separate OS processes, SIGKILL, a real database."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import make_run_dir
from sqlalchemy import text

from registry.service import Registry

WORKER = Path(__file__).resolve().parent / "register_worker.py"
PROCESSES = 16


def _spawn(url: str, store: Path, run_dir: Path, go_file: Path | None = None) -> subprocess.Popen:
    args = [sys.executable, str(WORKER), url, str(store), str(run_dir)] + ([str(go_file)] if go_file else [])
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _blob_files(store: Path) -> list[Path]:
    return [p for p in (store / "blobs").rglob("*") if p.is_file()] if (store / "blobs").exists() else []


def _assert_every_blob_complete(store: Path) -> None:
    for blob in _blob_files(store):
        assert hashlib.sha256(blob.read_bytes()).hexdigest() == blob.name, f"incomplete blob {blob}"


def test_parallel_registrations_get_distinct_consecutive_versions(db_url: str, tmp_path: Path) -> None:
    store, go = tmp_path / "store", tmp_path / "go"
    Registry(db_url, store).close()  # half the runs below also race the first creation of the expert
    runs = [
        make_run_dir(tmp_path / f"run{i}", tasks=("shared",), router=False, seed=i) for i in range(PROCESSES)
    ]
    workers = [_spawn(db_url, store, run, go) for run in runs]
    time.sleep(3.0)  # let every worker finish importing so they all start together
    go.touch()
    outputs = [w.communicate(timeout=300) for w in workers]

    for worker, (_stdout, stderr) in zip(workers, outputs, strict=True):
        assert worker.returncode == 0, stderr
        assert stderr.strip() == "", f"users saw: {stderr}"
    results = [json.loads(stdout.strip().splitlines()[-1]) for stdout, _ in outputs]
    versions = sorted(int(r["versions"][0].split("@")[1]) for r in results)
    assert versions == list(range(1, PROCESSES + 1))
    print(
        f"\n{PROCESSES} concurrent registers: max {max(r['seconds'] for r in results):.2f} s, "
        f"busy retries {sum(r['busy_retries'] for r in results)}, "
        f"conflict retries {sum(r['conflict_retries'] for r in results)}"
    )

    registry = Registry(db_url, store)
    with registry.engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM experts")).scalar() == 1
        assert conn.execute(text("SELECT count(*) FROM expert_versions")).scalar() == PROCESSES
        orphans = conn.execute(
            text(
                "SELECT count(*) FROM artifacts a WHERE NOT EXISTS "
                "(SELECT 1 FROM expert_versions v WHERE v.artifact_id = a.id)"
            )
        ).scalar()
        assert orphans == 0
        assert conn.execute(text("SELECT count(*) FROM artifact_files")).scalar() == 2 * PROCESSES
    versions = [v.version for v in registry.list_versions("shared")]
    assert sorted(versions) == list(range(1, PROCESSES + 1))  # each registration saw the one before
    assert registry.verify().ok


def _wait_for(predicate, timeout_s: float = 60.0, interval_s: float = 0.001) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval_s)
    return False


def test_sigkill_during_copy_leaves_nothing_visible(tmp_path: Path) -> None:
    url, store = f"sqlite:///{tmp_path / 'registry.db'}", tmp_path / "store"
    big = 512 << 20
    run = make_run_dir(tmp_path / "run", tasks=("big",), router=False, weights_bytes=big)
    Registry(url, store).close()

    def partial_copy() -> bool:
        parts = list((store / "tmp").glob("blob-*.part")) if (store / "tmp").exists() else []
        return any(0 < p.stat().st_size < big for p in parts)

    worker = _spawn(url, store, run)
    try:
        assert _wait_for(partial_copy), "the worker never started copying the large file"
        os.kill(worker.pid, signal.SIGKILL)
    finally:
        worker.wait(timeout=30)
    assert worker.returncode == -signal.SIGKILL

    registry = Registry(url, store)
    assert registry.list_experts() == []
    assert any(p.name.endswith(".part") for p in (store / "tmp").iterdir()), (
        "expected the killed copy's temp file"
    )
    _assert_every_blob_complete(store)
    report = registry.gc(grace_s=0)
    assert report.temp_files and not list((store / "tmp").iterdir())
    assert registry.register_run(run).experts[0].ref == "big@1"
    assert registry.verify().ok


def test_sigkill_after_copy_before_commit_leaves_no_version(tmp_path: Path) -> None:
    url, store = f"sqlite:///{tmp_path / 'registry.db'}", tmp_path / "store"
    run = make_run_dir(tmp_path / "run", tasks=("solo",), router=False)
    registry = Registry(url, store)
    expected = {hashlib.sha256(p.read_bytes()).hexdigest() for p in (run / "experts" / "solo").iterdir()}

    holder = sqlite3.connect(tmp_path / "registry.db", isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")  # the worker copies its blobs, then blocks before its transaction
    worker = _spawn(url, store, run)
    try:
        assert _wait_for(lambda: expected <= {p.name for p in _blob_files(store)}, interval_s=0.01)
        time.sleep(0.5)
        assert worker.poll() is None, "the worker should be waiting for the write lock"
        os.kill(worker.pid, signal.SIGKILL)
        worker.wait(timeout=30)
    finally:
        holder.execute("ROLLBACK")
        holder.close()

    assert registry.list_experts() == []
    _assert_every_blob_complete(store)
    assert registry.gc(grace_s=3600).blobs == []  # young blobs are protected by the grace period
    report = registry.gc(grace_s=0)
    assert {Path(p).name for p in report.blobs} == expected
    assert registry.register_run(run).experts[0].ref == "solo@1"
    assert registry.verify().ok and registry.artifact_path(registry.resolve("solo")).is_dir()


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_processes_opening_a_fresh_database_migrate_it_once(db_url: str, tmp_path: Path) -> None:
    code = "import sys; from registry.service import Registry; Registry(sys.argv[1], sys.argv[2])"
    workers = [
        subprocess.Popen(
            [sys.executable, "-c", code, db_url, str(tmp_path / "store")], stderr=subprocess.PIPE, text=True
        )
        for _ in range(6)
    ]
    for worker in workers:
        _, stderr = worker.communicate(timeout=120)
        assert worker.returncode == 0, stderr
    registry = Registry(db_url, tmp_path / "store")
    assert registry.state_token() == "1"
