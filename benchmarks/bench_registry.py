"""How fast is the registry on its hot paths? Resolve p50 target ≤ 1 ms over 10,000 resolves.

Registers N tiny run dirs (one expert each, fresh content) into a fresh SQLite registry, then resolves
`name`, `name@prod` and `name@<version>` 10,000 times and polls `state_token()` like the gateway does.
Also times `latest_router()` (the gateway polls it with the state token) and reading an A/B
experiment back (`experiment_requests` / `experiment_outcomes` over `--log-rows` logged requests and
outcomes, as `moea ab report` does). Baseline measured in the same run: a raw sqlite3 primary-key
SELECT on the same file, so the printed ratio says how much the registry adds over the database
itself. Writes benchmarks/results/registry.json (`mode` in the file says which size).

    .venv/bin/python benchmarks/bench_registry.py            # 1000 registers, 10,000 resolves, 50,000 rows
    .venv/bin/python benchmarks/bench_registry.py --quick    # 200 registers, 3,000 resolves, 20,000 rows
    .venv/bin/python benchmarks/bench_registry.py --smoke    # 20 registers, 300 resolves, 1,000 rows (CI)
    .venv/bin/python benchmarks/bench_registry.py --quick --registers 500 --resolves 5000 --log-rows 50000
"""

from __future__ import annotations

import shutil
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "tests" / "registry"))

from common import mode, standard_parser, summary, write_result  # noqa: E402
from helpers import make_run_dir  # noqa: E402

from registry import db  # noqa: E402
from registry.models import utcnow  # noqa: E402
from registry.service import Registry  # noqa: E402
from registry.views import OutcomeRecord, RequestRecord  # noqa: E402

TARGET_RESOLVE_P50_MS = 1.0
"""Budget for one ``resolve`` (the gateway resolves the requested name on every request)."""

SIZES: dict[str, dict[str, int]] = {
    "smoke": {"registers": 20, "resolves": 300, "log_rows": 1_000},
    "quick": {"registers": 200, "resolves": 3_000, "log_rows": 20_000},
    "full": {"registers": 1_000, "resolves": 10_000, "log_rows": 50_000},
}
"""Default sizes per mode (``--registers``/``--resolves``/``--log-rows`` override)."""


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


def _time_best(fn, repeats: int = 3) -> float:  # type: ignore[no-untyped-def]
    """Fastest of `repeats` calls in seconds (bulk reads: the minimum is the least noisy estimate)."""
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - started)
    return best


def _log_experiment(registry: Registry, rows: int) -> int:
    """Start an experiment on `bench` and log `rows` requests and outcomes under it; returns its id."""
    experiment = registry.start_experiment("bench", [(1, 1.0), (2, 1.0)], metric="reward")
    now = utcnow()
    for start in range(0, rows, 10_000):
        ids = [f"req-{i}" for i in range(start, min(rows, start + 10_000))]
        registry.log_requests(
            [
                RequestRecord(
                    f, now, "bench", 1 + i % 2, experiment.id, f"u{i % 97}", True, 12.5, 20, 30, 200
                )
                for i, f in enumerate(ids)
            ]
        )
        registry.record_outcomes(
            [OutcomeRecord(f, now, reward=float(i % 2), thumbs=None) for i, f in enumerate(ids)]
        )
    return experiment.id


def main(argv: list[str] | None = None) -> int:
    parser = standard_parser(__doc__.splitlines()[0])
    parser.add_argument("--registers", type=int, default=None, help="run dirs to register (default: by size)")
    parser.add_argument("--resolves", type=int, default=None, help="timed resolves (default: by size)")
    parser.add_argument(
        "--log-rows",
        type=int,
        default=None,
        help="requests+outcomes logged for the A/B read (default: by size)",
    )
    args = parser.parse_args(argv)
    size = mode(args)
    args.registers = args.registers or SIZES[size]["registers"]
    args.resolves = args.resolves or SIZES[size]["resolves"]
    args.log_rows = args.log_rows or SIZES[size]["log_rows"]
    if args.registers < 2 or args.resolves < 1 or args.log_rows < 1:
        parser.error("--registers must be >= 2, --resolves and --log-rows >= 1")
    work = Path(tempfile.mkdtemp(prefix="moea-bench-registry-"))
    registry = Registry(f"sqlite:///{work / 'registry.db'}", work / "store")

    runs = [
        make_run_dir(work / "runs" / f"r{i}", tasks=("bench",), router=False, seed=i, weights_bytes=2048)
        for i in range(args.registers)
    ]
    register = _percentiles(_time_calls(lambda i: registry.register_run(runs[i]), args.registers))
    registry.promote(f"bench@{args.registers // 2}", "prod")
    # one more run carrying a router, so latest_router() has something to return
    registry.register_run(make_run_dir(work / "runs" / "router", tasks=("bench",), router=True, seed=-1))

    refs = ["bench", "bench@prod", f"bench@{args.registers}"]
    resolve = _percentiles(_time_calls(lambda i: registry.resolve(refs[i % 3]), args.resolves))
    token = _percentiles(_time_calls(lambda _i: registry.state_token(), args.resolves))
    router = _percentiles(_time_calls(lambda _i: registry.latest_router(), args.resolves))
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
    experiment_id = _log_experiment(registry, args.log_rows)
    requests_s = _time_best(lambda: registry.experiment_requests(experiment_id))
    outcomes_s = _time_best(lambda: registry.experiment_outcomes(experiment_id))
    assert len(registry.experiment_requests(experiment_id)) == args.log_rows
    summaries = [
        summary(
            "registry resolve p50 (name, name@prod, name@N)",
            "p50 latency",
            round(resolve["p50_ms"], 4),
            TARGET_RESOLVE_P50_MS,
            unit="ms",
            higher_is_better=False,
            target=1.0,
            baseline_name="1 ms budget",
        ),
        summary(
            "registry resolve p50 vs the database alone",
            "p50 latency",
            round(resolve["p50_ms"], 4),
            round(baseline["p50_ms"], 4),
            unit="ms",
            higher_is_better=False,
            baseline_name="raw sqlite3 PK SELECT",
        ),
    ]
    result = {
        "mode": size,
        "summary": summaries[0],
        "summaries": summaries,
        "backend": "sqlite (WAL, synchronous=FULL)",
        "registers": args.registers,
        "register": register,
        "resolves": args.resolves,
        "resolve": resolve,
        "state_token": token,
        "latest_router": router,
        "log_rows": args.log_rows,
        "experiment_requests_s": requests_s,
        "experiment_outcomes_s": outcomes_s,
        "artifact_path_cached": artifact_path,
        "baseline_raw_sqlite_pk_select": baseline,
        "resolve_p50_over_baseline": resolve["p50_ms"] / baseline["p50_ms"],
        "target_resolve_p50_ms": TARGET_RESOLVE_P50_MS,
        "meets_target": resolve["p50_ms"] <= TARGET_RESOLVE_P50_MS,
        "internal_retries": {"busy": db.STATS.busy, "conflicts": db.STATS.conflicts},
    }
    registry.close()
    raw.close()
    shutil.rmtree(work, ignore_errors=True)
    path = write_result("registry", result, results_dir=args.results_dir)
    print(
        f"register      p50 {register['p50_ms']:.2f} ms  p95 {register['p95_ms']:.2f} ms  ({args.registers} runs)"
    )
    print(
        f"resolve       p50 {resolve['p50_ms']:.3f} ms  p95 {resolve['p95_ms']:.3f} ms  p99 {resolve['p99_ms']:.3f} ms  "
        f"({resolve['p50_ms'] / baseline['p50_ms']:.1f}x raw sqlite PK select {baseline['p50_ms']:.3f} ms; target ≤ 1 ms)"
    )
    print(
        f"state_token   p50 {token['p50_ms']:.3f} ms   artifact_path (verified, cached) p50 {artifact_path['p50_ms']:.3f} ms"
    )
    print(f"latest_router p50 {router['p50_ms']:.3f} ms  p99 {router['p99_ms']:.3f} ms")
    print(
        f"experiment_requests {requests_s:.3f} s  experiment_outcomes {outcomes_s:.3f} s  ({args.log_rows} rows each)"
    )
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
