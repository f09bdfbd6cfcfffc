"""Training's thread count: physical cores of the affinity set (moved from test_train.py with the code)."""

from __future__ import annotations

import os
from pathlib import Path

from moe_adapters import hardware
from moe_adapters.hardware import choose_num_threads


def fake_topology(root: Path, cores: dict[int, tuple[int, int]]) -> Path:
    """A sysfs cpu folder: logical cpu → (package, core)."""
    for cpu, (package, core) in cores.items():
        topology = root / f"cpu{cpu}" / "topology"
        topology.mkdir(parents=True)
        (topology / "physical_package_id").write_text(f"{package}\n")
        (topology / "core_id").write_text(f"{core}\n")
    return root


def test_threads_default_to_physical_cores_the_process_may_use(tmp_path, monkeypatch):
    import psutil

    # 2 sockets x 2 cores x 2 hyperthreads; a busy machine (load average) no longer lowers the count.
    siblings = {cpu: (cpu // 4, (cpu // 2) % 2) for cpu in range(8)}
    monkeypatch.setattr(hardware, "_SYSFS_CPU", fake_topology(tmp_path / "cpu", siblings))
    monkeypatch.setattr(os, "getloadavg", lambda: (7.0, 7.0, 7.0))
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)))
    assert choose_num_threads() == 4
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2})  # core 0's two threads + core 1
    assert choose_num_threads() == 2
    assert choose_num_threads(3) == 3  # train.num_threads overrides
    # Without a readable topology: psutil's physical count, bounded by the affinity set.
    monkeypatch.setattr(hardware, "_SYSFS_CPU", tmp_path / "missing")
    monkeypatch.setattr(psutil, "cpu_count", lambda logical=True: 2 if not logical else 4)
    assert choose_num_threads() == 2
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {5})
    assert choose_num_threads() == 1
