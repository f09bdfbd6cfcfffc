"""Gateway overhead: the same requests sent to vLLM directly and through `moea serve --engine-url`.

Question: how much latency and throughput does the gateway cost (target ≤ 2 ms p50 added, ≥ 0.97×
throughput)? One vLLM server is started; the gateway runs as its own process in front of it (so it
does not share the benchmark client's interpreter). Both paths send the identical request
(`model` = an expert's LoRA, max_tokens=1) with pooled keep-alive httpx clients.

    .venv/bin/python benchmarks/bench_gateway.py [--requests 200] [--concurrency 8] [--duration 20]

Writes benchmarks/results/gateway.json. On a 2-core CPU machine the gateway competes with vLLM for
the same cores, so the throughput ratio is pessimistic compared with a GPU host.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httpx  # noqa: E402
from bench_serving import KEY, moea_serve, synthetic_runs  # noqa: E402
from common import percentile, ratio, write_result  # noqa: E402


async def paired_latency(
    direct_url: str,
    gateway_url: str,
    bodies: tuple[dict[str, Any], dict[str, Any]],
    n: int,
    auth: dict[str, str],
) -> tuple[list[float], list[float]]:
    """Latency (s) of `n` one-at-a-time requests per path, alternating direct/gateway request by request
    so that drift in machine load (shared CI hosts) hits both paths alike."""
    direct_body, gateway_body = bodies
    async with (
        httpx.AsyncClient(base_url=direct_url, timeout=60) as direct,
        httpx.AsyncClient(base_url=gateway_url, headers=auth, timeout=60) as gateway,
    ):
        for _ in range(5):  # warm-up: connections, adapter caches
            (await direct.post("/v1/chat/completions", json=direct_body)).raise_for_status()
            (await gateway.post("/v1/chat/completions", json=gateway_body)).raise_for_status()
        times: tuple[list[float], list[float]] = ([], [])
        for i in range(2 * n):
            client, body, out = (
                (direct, direct_body, times[0]) if i % 2 == 0 else (gateway, gateway_body, times[1])
            )
            started = time.perf_counter()
            (await client.post("/v1/chat/completions", json=body)).raise_for_status()
            out.append(time.perf_counter() - started)
        return times


def overhead_p50_ms(gateway_url: str, auth: dict[str, str]) -> float | None:
    """Median of the gateway's own `moea_gateway_overhead_seconds` histogram (parse → forward), in ms."""
    text = httpx.get(f"{gateway_url}/metrics", headers=auth, timeout=30).text
    buckets = []
    for line in text.splitlines():
        if line.startswith("moea_gateway_overhead_seconds_bucket") and 'endpoint="chat"' in line:
            bound = line.split('le="')[1].split('"')[0]
            buckets.append((float("inf") if bound == "+Inf" else float(bound), float(line.rsplit(" ", 1)[1])))
    if not buckets or buckets[-1][1] == 0:
        return None
    half = buckets[-1][1] / 2
    return (
        next(bound for bound, count in buckets if count >= half) * 1000
    )  # upper bound of the median's bucket


async def throughput(
    url: str, body: dict[str, Any], concurrency: int, duration_s: float, headers: dict[str, str]
) -> float:
    """Completed requests per second with `concurrency` closed-loop clients."""
    done = 0
    stop_at = time.monotonic() + duration_s
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=120, limits=limits) as client:

        async def worker() -> None:
            nonlocal done
            while time.monotonic() < stop_at:
                (await client.post("/v1/chat/completions", json=body)).raise_for_status()
                done += 1

        started = time.monotonic()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return done / (time.monotonic() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=200, help="sequential requests per path")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--duration", type=float, default=20.0, help="seconds per throughput run")
    parser.add_argument("--rounds", type=int, default=2, help="alternating direct/gateway rounds")
    args = parser.parse_args()
    from moe_adapters.base_model import DEFAULT_BASE_NAME, resolve_base_model
    from registry.service import Registry
    from serving.engine import EngineSettings, VLLMProcess

    with tempfile.TemporaryDirectory(prefix="moea-bench-gateway-") as tmp:
        home = Path(tmp)
        run1, _ = synthetic_runs(home / "runs")
        registry = Registry(f"sqlite:///{home / 'registry.db'}", home / "store")
        expert = registry.register_run(run1).experts[0]
        engine = VLLMProcess(EngineSettings(model=resolve_base_model(None), served_name=DEFAULT_BASE_NAME,
                                            cpu_threads_bind="0-1", log_path=home / "vllm.log"))  # fmt: skip
        engine.start()
        try:
            asyncio.run(_wait(engine))
            serve_args = ("--engine-url", engine.url, "--served-model-name", DEFAULT_BASE_NAME)
            with moea_serve(home, *serve_args) as gateway_url:
                # The gateway loaded the expert into the engine: both paths can now name its LoRA.
                direct_body = {
                    "model": expert.ref,
                    "messages": [{"role": "user", "content": "Hi"}],
                    "max_tokens": 1,
                }
                gateway_body = dict(direct_body, model=expert.name)
                auth = {"Authorization": f"Bearer {KEY}"}
                lat = {"direct": [], "gateway": []}
                rps = {"direct": [], "gateway": []}
                for _ in range(args.rounds):
                    direct, via = asyncio.run(
                        paired_latency(
                            engine.url, gateway_url, (direct_body, gateway_body), args.requests, auth
                        )
                    )
                    lat["direct"] += direct
                    lat["gateway"] += via
                    rps["direct"].append(
                        asyncio.run(throughput(engine.url, direct_body, args.concurrency, args.duration, {}))
                    )
                    rps["gateway"].append(
                        asyncio.run(
                            throughput(gateway_url, gateway_body, args.concurrency, args.duration, auth)
                        )
                    )
                in_gateway_ms = overhead_p50_ms(gateway_url, auth)
        finally:
            engine.stop()
            registry.close()

    p50 = {path: percentile(values, 50) * 1000 for path, values in lat.items()}
    p99 = {path: percentile(values, 99) * 1000 for path, values in lat.items()}
    tput = {path: statistics.median(values) for path, values in rps.items()}
    result = {
        "requests_per_path": len(lat["direct"]), "concurrency": args.concurrency,
        "latency_p50_ms": {k: round(v, 2) for k, v in p50.items()},
        "latency_p99_ms": {k: round(v, 2) for k, v in p99.items()},
        "added_p50_ms": round(p50["gateway"] - p50["direct"], 3),
        "added_paired_median_ms": round(
            statistics.median(g - d for g, d in zip(lat["gateway"], lat["direct"], strict=True)) * 1000, 3
        ),
        "in_gateway_overhead_p50_ms_upper_bound": in_gateway_ms,
        "throughput_rps": {k: round(v, 2) for k, v in tput.items()},
        "throughput_ratio_gateway_vs_direct": ratio(tput["gateway"], tput["direct"]),
    }  # fmt: skip
    path = write_result("gateway", result)
    print(f"p50 direct {p50['direct']:.2f} ms, via gateway {p50['gateway']:.2f} ms (+{result['added_p50_ms']} ms, paired median "
          f"+{result['added_paired_median_ms']} ms, in-gateway p50 ≤ {in_gateway_ms} ms); "
          f"throughput {tput['direct']:.1f} → {tput['gateway']:.1f} req/s "
          f"(×{result['throughput_ratio_gateway_vs_direct']}) → {path}")  # fmt: skip


async def _wait(engine: Any) -> None:
    async with httpx.AsyncClient() as client:
        await engine.wait_healthy(client)


if __name__ == "__main__":
    main()
