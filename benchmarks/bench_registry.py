"""How fast is the registry on its hot paths? Resolve p50 target ≤ 1 ms over 10,000 resolves.

Registers N tiny run dirs (one expert each, fresh content) into a fresh SQLite registry, then resolves
`name`, `name@prod` and `name@<version>` 10,000 times and polls `state_token()` like the gateway does.
Baseline measured in the same run: a raw sqlite3 primary-key SELECT on the same file, so the printed
ratio says how much the registry adds over the database itself. Writes benchmarks/results/registry.json.

    .venv/bin/python benchmarks/bench_registry.py [--registers 1000] [--resolves 10000]
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "registry"))

from helpers import make_run_dir  # noqa: E402

from registry import db  # noqa: E402
from registry.service import Registry  # noqa: E402


def _percentiles(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000  # noqa: E731
    return {
        "p50_ms": pick(0.50),
        "p95_ms": pick(0.95),
        "p99_ms": pick(0.99),
        "mean_ms": statistics.fmean(ordered) * 1000,
    }


def _time_calls(fn, count: int) -> list[float]:  # type: ignore[no-untyped-def]
    samples = []
    for index in range(count):
        started = time.perf_counter()
        fn(index)
        samples.append(time.perf_counter() - started)
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--registers", type=int, default=1000)
    parser.add_argument("--resolves", type=int, default=10_000)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "registry.json")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="moea-bench-registry-"))
    registry = Registry(f"sqlite:///{work / 'registry.db'}", work / "store")

    runs = [
        make_run_dir(work / "runs" / f"r{i}", tasks=("bench",), router=False, seed=i, weights_bytes=2048)
        for i in range(args.registers)
    ]
    register = _percentiles(_time_calls(lambda i: registry.register_run(runs[i]), args.registers))
    registry.promote(f"bench@{args.registers // 2}", "prod")

    refs = ["bench", "bench@prod", f"bench@{args.registers}"]
    resolve = _percentiles(_time_calls(lambda i: registry.resolve(refs[i % 3]), args.resolves))
    token = _percentiles(_time_calls(lambda _i: registry.state_token(), args.resolves))
    view = registry.resolve("bench@prod")
    registry.artifact_path(view)
    artifact_path = _percentiles(_time_calls(lambda _i: registry.artifact_path(view), 1000))

    raw = sqlite3.connect(work / "registry.db")
    baseline = _percentiles(
        _time_calls(
            lambda i: raw.execute(
                "SELECT * FROM expert_versions WHERE id = ?", (i % args.registers + 1,)
            ).fetchone(),
            args.resolves,
        )
    )
    result = {
        "backend": "sqlite (WAL, synchronous=FULL)",
        "registers": args.registers,
        "register": register,
        "resolves": args.resolves,
        "resolve": resolve,
        "state_token": token,
        "artifact_path_cached": artifact_path,
        "baseline_raw_sqlite_pk_select": baseline,
        "resolve_p50_over_baseline": resolve["p50_ms"] / baseline["p50_ms"],
        "target_resolve_p50_ms": 1.0,
        "meets_target": resolve["p50_ms"] <= 1.0,
        "internal_retries": {"busy": db.STATS.busy, "conflicts": db.STATS.conflicts},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(
        f"register      p50 {register['p50_ms']:.2f} ms  p95 {register['p95_ms']:.2f} ms  ({args.registers} runs)"
    )
    print(
        f"resolve       p50 {resolve['p50_ms']:.3f} ms  p99 {resolve['p99_ms']:.3f} ms  "
        f"({resolve['p50_ms'] / baseline['p50_ms']:.1f}x raw sqlite PK select {baseline['p50_ms']:.3f} ms; target ≤ 1 ms)"
    )
    print(
        f"state_token   p50 {token['p50_ms']:.3f} ms   artifact_path (verified, cached) p50 {artifact_path['p50_ms']:.3f} ms"
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
