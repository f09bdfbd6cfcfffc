"""Load test of `moea serve`: N concurrent openai clients for a fixed time, with an alias promotion and
an experiment start in the middle. Question: does anything fail during hot swaps, is the A/B split
right, is every request logged?

    .venv/bin/python benchmarks/bench_serving.py [--quick | --smoke] [--run-dir RUN] [--clients 8] [--duration 60]

Sizes (``--clients``/``--duration``/``--max-tokens`` override): full 8 clients x 60 s, ``--quick``
4 x 30 s, ``--smoke`` 2 x 12 s at max_tokens=2 (checks that it runs; too short for a meaningful SRM test).

Without --run-dir, two synthetic run dirs (random-weight LoRA adapters + a trained router, built by
the serving test fixtures) are used: serving cost does not depend on the adapter weights' values.
Writes benchmarks/results/serving.json. There is no baseline: the summary row is the throughput under
the swaps, and it is "met" only when no request failed, the A/B split passes the SRM check and every
request of the experiment was logged.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from contextlib import contextmanager
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httpx  # noqa: E402
import openai  # noqa: E402
from common import machine_info, mode, percentile, standard_parser, summary, write_result  # noqa: E402

KEY = "bench-key"

SIZES: dict[str, dict[str, float]] = {
    "smoke": {"clients": 2, "duration": 12.0, "max_tokens": 2},
    "quick": {"clients": 4, "duration": 30.0, "max_tokens": 8},
    "full": {"clients": 8, "duration": 60.0, "max_tokens": 8},
}
"""Default clients, load duration (s; each third is one phase) and max_tokens per size."""


def synthetic_runs(root: Path) -> tuple[Path, Path]:
    """Two run dirs (versions 1 and 2 of tasks math/sentiment) built like the serving tests do."""
    from moe_adapters.base_model import resolve_base_model
    from moe_adapters.config import RouterSettings
    from moe_adapters.router_training import train_router
    from tests.serving.conftest import build_run_dir, task_prompts

    base = resolve_base_model(None)
    train_router(
        task_prompts(60, 0),
        task_prompts(20, 1),
        root / "router",
        RouterSettings(encoder="minilm", heads=("linear",)),
    )
    return build_run_dir(root / "run1", base, 1, root / "router"), build_run_dir(
        root / "run2", base, 2, root / "router"
    )


@contextmanager
def moea_serve(home: Path, *extra: str, log_name: str = "serve.log"):  # type: ignore[no-untyped-def]
    """Run `python -m serving.cli` on a free port until the block ends; yields its URL (its output goes to
    `home/log_name`: give each of several gateways on one registry its own)."""
    from registry.local import free_port

    port = free_port()
    env = dict(os.environ, MOEA_REGISTRY_URL=f"sqlite:///{home / 'registry.db'}", MOEA_STORE_DIR=str(home / "store"),
               MOEA_API_KEYS=KEY, HF_HUB_OFFLINE="1")  # fmt: skip
    log = open(home / log_name, "wb")  # noqa: SIM115 - closed below
    process = subprocess.Popen(
        [sys.executable, "-m", "serving.cli", "--port", str(port), "--poll-interval", "0.2", *extra],
        env=env, stdout=log, stderr=subprocess.STDOUT, cwd=Path(__file__).resolve().parent.parent,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 600
        while True:
            if process.poll() is not None:
                tail = (home / log_name).read_text(errors="replace").splitlines()[-15:]
                raise RuntimeError("moea serve exited:\n" + "\n".join(tail))
            if time.monotonic() > deadline:
                raise RuntimeError("moea serve did not become healthy in 600 s")
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=90)
        log.close()


def run_load(url: str, registry: Any, clients: int, duration_s: float, max_tokens: int) -> dict[str, Any]:
    """The load phase: clients loop; at 1/3 prod moves to v2, at 2/3 an experiment 30/70 starts."""
    from serving.ab.stats import srm_check

    results: list[tuple[str, str, str | None, float]] = []
    failures: list[str] = []
    lock, stop = threading.Lock(), threading.Event()
    prompts = ["Tom has 3 apples and buys 4 more. How many apples does Tom have now?",
               "Review: The laptop broke after two days.\nIs this review positive or negative?", "hello there"]  # fmt: skip

    def loop(worker: int) -> None:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=120)
        rng = random.Random(worker)
        while not stop.is_set():
            model = rng.choice(["math", "moe", "math@prod"])
            started = time.perf_counter()
            try:
                raw = client.chat.completions.with_raw_response.create(
                    model=model, messages=[{"role": "user", "content": rng.choice(prompts)}], max_tokens=max_tokens,
                    user=f"user-{worker}-{rng.randint(0, 99)}",
                )  # fmt: skip
                row = (raw.parse().id, raw.headers["x-moea-expert"], raw.headers.get("x-moea-experiment"),
                       time.perf_counter() - started)  # fmt: skip
                with lock:
                    results.append(row)
            except Exception as error:  # noqa: BLE001 - counted and reported
                with lock:
                    failures.append(f"{model}: {error!r}")

    threads = [threading.Thread(target=loop, args=(i,)) for i in range(clients)]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    time.sleep(duration_s / 3)
    registry.promote("math@2")
    time.sleep(duration_s / 3)
    experiment = registry.start_experiment("math", [(1, 30.0), (2, 70.0)], metric="reward")
    time.sleep(duration_s / 3)
    stop.set()
    for thread in threads:
        thread.join()
    wall = time.monotonic() - started
    registry.stop_experiment("math")
    arm_requests = {rid: expert for rid, expert, exp, _ in results if exp == str(experiment.id)}
    split = Counter(arm_requests.values())
    srm = srm_check([split["math@1"], split["math@2"]], [30.0, 70.0])
    deadline = time.monotonic() + 30
    logged: set[str] = set()
    while time.monotonic() < deadline:
        logged = {r.request_id for r in registry.experiment_requests(experiment.id)}
        if logged >= set(arm_requests):
            break
        time.sleep(0.5)
    latencies = [seconds * 1000 for *_, seconds in results]
    return {
        "clients": clients, "duration_s": round(wall, 1), "requests": len(results), "failed_requests": len(failures),
        "failures_sample": failures[:5], "throughput_rps": round(len(results) / wall, 2),
        "latency_ms": {"p50": round(percentile(latencies, 50), 1) if latencies else None,
                       "p99": round(percentile(latencies, 99), 1) if latencies else None},
        "experts_served": dict(Counter(expert for _, expert, _, _ in results)),
        "experiment": {"arms": {"math@1": 30, "math@2": 70}, "observed": dict(split), "srm_p_value": srm.p_value,
                       "srm_flagged": srm.flagged, "requests_logged": len(logged & set(arm_requests)),
                       "requests_in_experiment": len(arm_requests)},
    }  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = standard_parser(__doc__.splitlines()[0])
    parser.add_argument("--run-dir", type=Path, help="trained run dir (registered twice: versions 1 and 2)")
    parser.add_argument(
        "--clients", type=int, default=None, help="concurrent openai clients (default: by size)"
    )
    parser.add_argument("--duration", type=float, default=None, help="seconds of load (default: by size)")
    parser.add_argument(
        "--max-tokens", type=int, default=None, help="max_tokens of every request (default: by size)"
    )
    parser.add_argument("--serve-arg", action="append", default=["--cpu-threads-bind", "0-1"])
    args = parser.parse_args(argv)
    size = mode(args)
    clients = int(args.clients or SIZES[size]["clients"])
    duration = args.duration or SIZES[size]["duration"]
    max_tokens = int(args.max_tokens or SIZES[size]["max_tokens"])
    if clients < 1 or duration <= 0:
        parser.error("--clients must be >= 1 and --duration > 0")
    from registry.service import Registry

    with tempfile.TemporaryDirectory(prefix="moea-bench-serving-") as tmp:
        home = Path(tmp)
        run1, run2 = (args.run_dir, args.run_dir) if args.run_dir else synthetic_runs(home / "runs")
        registry = Registry(f"sqlite:///{home / 'registry.db'}", home / "store")
        registry.register_run(run1)
        registry.register_run(run2)
        registry.promote("math@1")
        with moea_serve(home, *args.serve_arg) as url:
            result = run_load(url, registry, clients, duration, max_tokens)
        registry.close()
    experiment = result["experiment"]
    healthy = (
        result["failed_requests"] == 0
        and not experiment["srm_flagged"]
        and experiment["requests_logged"] == experiment["requests_in_experiment"]
    )
    throughput_row = summary(
        f"multi-LoRA serving through a promote + A/B start, {clients} clients "
        "(0 failed, SRM ok, every A/B request logged)",
        "throughput",
        result["throughput_rps"],
        None,
        unit="req/s",
        higher_is_better=True,
        baseline_name="none",
    )
    throughput_row["met"] = healthy  # no baseline: the verdict is the correctness checks above
    latency_row = summary(
        f"request latency p50 under load, {clients} clients, max_tokens={max_tokens}",
        "p50 latency",
        result["latency_ms"]["p50"],
        None,
        unit="ms",
        higher_is_better=False,
        baseline_name="none",
    )
    result = {
        "mode": size,
        "summary": throughput_row,
        "summaries": [throughput_row, latency_row],
        "max_tokens": max_tokens,
        **result,
    }
    result["machine"] = machine_info()
    path = write_result("serving", result, results_dir=args.results_dir)
    print(f"requests {result['requests']}, failed {result['failed_requests']}, {result['throughput_rps']} req/s, "
          f"p50 {result['latency_ms']['p50']} ms; experiment split {result['experiment']['observed']} "
          f"(SRM p={result['experiment']['srm_p_value']:.3g}); logged {result['experiment']['requests_logged']}/"
          f"{result['experiment']['requests_in_experiment']} → {'OK' if healthy else 'PROBLEMS'} → {path}")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
