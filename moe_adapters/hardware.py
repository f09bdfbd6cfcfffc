"""Where training runs: the device and dtype, and how many CPU threads torch uses."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

_SYSFS_CPU = Path("/sys/devices/system/cpu")


def pick_device() -> tuple[torch.device, torch.dtype]:
    """CUDA (bf16 weights) when available, else CPU in fp32 (bf16 LoRA training on CPU is ~10x slower)."""
    if torch.cuda.is_available():
        return torch.device("cuda"), torch.bfloat16
    return torch.device("cpu"), torch.float32


def choose_num_threads(configured: int | None = None) -> int:
    """Intra-op threads: ``configured``, else every physical core this process may run on.

    Measured on a 2-core machine: subtracting the load average (the previous default) left training on 1
    core right after another job had finished (147 vs 268 tokens/s). Hyperthreads are not counted (they
    share a core's matrix units). On a machine shared with other CPU-heavy jobs, set ``train.num_threads``:
    OpenMP threads spin at barriers while a peer is descheduled, so oversubscription costs a lot.
    """
    return configured if configured else physical_cores()


def threads_reason(configured: int | None) -> str:
    """Where the thread count came from, for the "torch threads" line `moea train` prints."""
    if configured:
        return "train.num_threads"
    return "all physical cores; set train.num_threads to change"


def apply_num_threads(configured: int | None, *, announce: bool) -> int:
    """Set torch's intra-op threads (:func:`choose_num_threads`); with ``announce`` print the line every
    training command starts with (``torch threads: N (why)``) on stderr. Returns the count."""
    torch.set_num_threads(choose_num_threads(configured))
    if announce:
        print(
            f"torch threads: {torch.get_num_threads()} ({threads_reason(configured)})",
            file=sys.stderr,
            flush=True,
        )
    return torch.get_num_threads()


def physical_cores() -> int:
    """Physical cores among the CPUs in this process's affinity set (Linux sysfs topology).

    Falls back to ``psutil.cpu_count(logical=False)`` bounded by the affinity set where the topology
    cannot be read (other systems, restricted /sys).
    """
    if hasattr(os, "sched_getaffinity"):
        cpus = sorted(os.sched_getaffinity(0))
    else:
        cpus = list(range(os.cpu_count() or 1))
    cores = set()
    for cpu in cpus:
        topology = _SYSFS_CPU / f"cpu{cpu}" / "topology"
        try:
            package = (topology / "physical_package_id").read_text().strip()
            cores.add((package, (topology / "core_id").read_text().strip()))
        except OSError:
            import psutil

            return max(1, min(len(cpus), psutil.cpu_count(logical=False) or len(cpus)))
    return max(1, len(cores))
