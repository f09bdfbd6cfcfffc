"""A separate OS process that registers one run dir (used by the concurrency and crash tests).

Usage: python register_worker.py URL STORE_DIR RUN_DIR [GO_FILE]. With GO_FILE it imports everything,
then waits for that file to appear, so many workers hit the database at the same moment. Prints one
JSON line: the versions created and the number of internal retries.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from registry import db
from registry.service import Registry


def main() -> None:
    url, store, run_dir = sys.argv[1:4]
    go_file = Path(sys.argv[4]) if len(sys.argv) > 4 else None
    registry = Registry(url, store)
    while go_file is not None and not go_file.exists():
        time.sleep(0.002)
    started = time.perf_counter()
    result = registry.register_run(run_dir)
    print(
        json.dumps(
            {
                "versions": [v.ref for v in result.experts],
                "seconds": time.perf_counter() - started,
                "busy_retries": db.STATS.busy,
                "conflict_retries": db.STATS.conflicts,
            }
        )
    )


if __name__ == "__main__":
    main()
