"""Dashboard page render time: ms per page of `moea serve`'s /ui with 100 experts and 10,000 logged requests.

Question (issue 15): do the dashboard pages stay fast at that size? Target: every page renders in
≤ 300 ms server side (p50). The registry is filled through the real registry API into a real SQLite file
(tests/serving/ui_fixtures.py: 100 experts with two versions each, aliases and their history, one
running experiment, 10,000 logged requests with outcomes); each page is requested through FastAPI's
TestClient (in process: the app's own work, no network), after one untimed request. Also recorded:
the SQL statements each page issues (tests/serving/test_ui.py asserts they do not grow with the size).

    python benchmarks/bench_ui.py --quick    # 100 experts, 10,000 requests, 20 repeats per page
    python benchmarks/bench_ui.py            # same size, 50 repeats
    python benchmarks/bench_ui.py --smoke    # 5 experts, 200 requests, 3 repeats (CI)
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))

from common import mode, standard_parser, summary, time_calls, write_result  # noqa: E402

TARGET_MS = 300.0
SIZES = {
    "smoke": {"experts": 5, "requests": 200, "repeats": 3},
    "quick": {"experts": 100, "requests": 10_000, "repeats": 20},
    "full": {"experts": 100, "requests": 10_000, "repeats": 50},
}


def _statements(engine: Any, call: Any) -> int:
    from sqlalchemy import event

    count = {"n": 0}

    def seen(*_: Any) -> None:
        count["n"] += 1

    event.listen(engine, "before_cursor_execute", seen)
    try:
        call()
    finally:
        event.remove(engine, "before_cursor_execute", seen)
    return count["n"]


def main() -> int:
    args = standard_parser(__doc__.splitlines()[0]).parse_args()
    size = mode(args)
    settings = SIZES[size]
    from fastapi.testclient import TestClient

    from registry.service import Registry
    from serving.app import create_app
    from tests.serving.ui_fixtures import READER, bearer, fill_registry, make_gateway

    work = Path(tempfile.mkdtemp(prefix="moea-bench-ui-"))
    try:
        registry = Registry(f"sqlite:///{work / 'registry.db'}", work / "store")
        filled = fill_registry(registry, work, settings["experts"], settings["requests"])
        client = TestClient(create_app(make_gateway(registry)))
        paths = ["/ui/experts", "/ui/routing", "/ui/experiments", "/ui/engines",
                 f"/ui/api/experiments/{filled.experiment_id}"]  # fmt: skip
        pages: dict[str, Any] = {}
        for path in paths:

            def get(path: str = path) -> None:
                response = client.get(path, headers=bearer(READER))
                assert response.status_code == 200, (path, response.status_code)

            get()  # untimed: template compile, first connection
            statements = _statements(registry.engine, get)
            timing = time_calls(get, settings["repeats"])
            pages[path] = {**timing.summary_ms(), "sql_statements": statements}
            print(f"{path:32s} p50 {pages[path]['p50_ms']:7.1f} ms  p90 {pages[path]['p90_ms']:7.1f} ms  "
                  f"{statements} SQL statements")  # fmt: skip
        registry.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    slowest = max(pages, key=lambda p: pages[p]["p50_ms"])
    worst = pages[slowest]["p50_ms"]
    row = summary(
        f"dashboard page render p50, slowest page ({settings['experts']} experts, {settings['requests']} requests)",
        "p50 render",
        round(worst, 2),
        TARGET_MS,
        unit="ms",
        higher_is_better=False,
        target=1.0,
        baseline_name="300 ms budget",
    )
    result = {
        "mode": size,
        "summary": row,
        "experts": settings["experts"],
        "requests": settings["requests"],
        "repeats": settings["repeats"],
        "pages": pages,
        "slowest_page": slowest,
        "target_ms": TARGET_MS,
        "meets_target": worst <= TARGET_MS,
    }
    path = write_result("ui", result, results_dir=args.results_dir)
    print(f"slowest page {slowest}: p50 {worst:.1f} ms (target ≤ {TARGET_MS:.0f} ms) → {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
