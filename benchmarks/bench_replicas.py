"""Scale-out: throughput with 2 vLLM replicas vs 1 behind `moea serve --engine-url`, and a `kill -9` of one.

Questions: what does a second replica on the same host give (on 2 cores: it costs, it cannot gain — both
replicas share the same two cores, each with an OpenMP pool over both), and what does losing one under load
cost: failed requests, seconds from the kill until the gateway takes it out of rotation, seconds from its
restart until it serves again (its vLLM start, then the gateway loading every serving adapter into it)?

    .venv/bin/python benchmarks/bench_replicas.py [--quick | --smoke] [--clients 4] [--duration 15]
        [--rounds 2] [--max-tokens 8] [--load-during-restart]

Two vLLM CPU servers (A, B: `VLLM_CPU_KVCACHE_SPACE=1`, `VLLM_CPU_OMP_THREADS_BIND=0-1`, started as `moea
serve` starts its own) and two gateways on one registry (synthetic run: math, sentiment, router):
`--engine-url A` and `--engine-url A --engine-url B`. Throughput: the same closed-loop load (non-streamed
chat, cycling `moe`, `math`, `sentiment@1`) on each gateway, order alternating per round (B idles while the
one-replica gateway is measured). Failover, on the two-replica gateway under the same load: B's process
group gets SIGKILL; the gateway's /health (polled every 20 ms) says when B left the rotation; B is
restarted on its port; its own /health says when vLLM is up, the gateway's /health when B is back in
rotation, the gateway's `moea_engine_requests_total` when B takes its first request. Then B is killed once
more with no traffic: the health check alone takes it out (nothing in flight to notice it first). The load
pauses while B's vLLM starts and resumes once it answers /health (``--load-during-restart`` keeps it on:
B's start then competes with A's busy OpenMP threads for the same two cores, and took 264-626 s instead of
~35 s here — longer than run_all's 900 s per script allows at ``--quick``).

Sizes (the flags override): full 8 clients x 30 s, 3 rounds; ``--quick`` 4 x 15 s, 2 rounds; ``--smoke``
2 x 3 s, 1 round (checks that it runs: still two engine starts and a restart, ~3 min). max_tokens 8.

Writes benchmarks/results/replicas.json: a row for throughput (2 replicas vs 1; no target: on a 2-core
host expect < 1) and a row for failed requests during the kill (target 0).
"""

from __future__ import annotations

import asyncio
import os
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httpx  # noqa: E402
from bench_serving import KEY, moea_serve, synthetic_runs  # noqa: E402
from common import mode, ratio, standard_parser, summary, write_result  # noqa: E402

SIZES: dict[str, dict[str, float]] = {
    "smoke": {"clients": 2, "duration": 3.0, "rounds": 1},
    "quick": {"clients": 4, "duration": 15.0, "rounds": 2},
    "full": {"clients": 8, "duration": 30.0, "rounds": 3},
}
"""Default closed-loop clients, seconds per throughput run and rounds (one run per configuration each)."""

AUTH = {"Authorization": f"Bearer {KEY}"}
MATH = "Tom has 3 apples and buys 4 more. How many apples does Tom have now?"
REVIEW = "Review: The laptop broke after two days.\nIs this review positive or negative?"
BODIES = [("moe", MATH), ("math", MATH), ("sentiment@1", REVIEW), ("moe", REVIEW)]
"""(model, prompt) cycled by every client: routed, an expert's serving version, a pinned version."""


@dataclass
class Outcome:
    """What a closed-loop load got."""

    ok: int = 0
    tokens: int = 0
    failed: list[str] = field(default_factory=list)
    seconds: float = 0.0


async def drive(url: str, clients: int, max_tokens: int, done: Callable[[], bool]) -> Outcome:
    """`clients` loops, each sending the next of BODIES until `done()`; every answer is counted."""
    out = Outcome()
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, headers=AUTH, timeout=300, limits=limits) as http:

        async def loop(index: int) -> None:
            while not done():
                model, prompt = BODIES[index % len(BODIES)]
                index += 1
                body = {"model": model, "messages": [{"role": "user", "content": prompt}],
                        "max_tokens": max_tokens, "temperature": 0}  # fmt: skip
                try:
                    response = await http.post("/v1/chat/completions", json=body)
                except httpx.HTTPError as error:
                    out.failed.append(repr(error))
                    continue
                if response.status_code == 200:
                    out.ok += 1
                    out.tokens += response.json()["usage"]["completion_tokens"]
                else:
                    out.failed.append(f"{response.status_code} {response.text[:200]}")

        started = time.monotonic()
        await asyncio.gather(*(loop(index) for index in range(clients)))
        out.seconds = time.monotonic() - started
    return out


def for_seconds(seconds: float) -> Callable[[], bool]:
    deadline = time.monotonic() + seconds
    return lambda: time.monotonic() >= deadline


async def in_rotation(http: httpx.AsyncClient, gateway: str, engine: str) -> bool:
    """Whether the gateway has `engine` in rotation (its /health details, read with a `read` key)."""
    engines = (await http.get(f"{gateway}/health", headers=AUTH)).json()["engines"]
    return bool(next(e["healthy"] for e in engines if e["url"] == engine))


async def sent_to(http: httpx.AsyncClient, gateway: str, replica: str) -> float:
    """The gateway's `moea_engine_requests_total` for `replica` (host:port)."""
    from prometheus_client.parser import text_string_to_metric_families

    text = (await http.get(f"{gateway}/metrics", headers=AUTH)).text
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "moea_engine_requests_total" and sample.labels.get("replica") == replica
    )


async def until(check: Callable[[], Any], poll_s: float, timeout_s: float = 900.0) -> float:
    """Poll the async `check()` until it is true; the monotonic time it first was."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with_error = False
        try:
            if await check():
                return time.monotonic()
        except httpx.HTTPError:
            with_error = True
        await asyncio.sleep(poll_s if not with_error else max(poll_s, 0.1))
    raise RuntimeError(f"not reached in {timeout_s:.0f} s")


def start_engine(home: Path, name: str, port: int | None = None) -> Any:
    """A vLLM replica as `moea serve` starts its own (1 GiB KV cache, OpenMP over cores 0-1). Started from
    the main thread: the engine gets SIGTERM when the thread that started it ends."""
    from moe_adapters.base_model import DEFAULT_BASE_NAME, resolve_base_model
    from serving.vllm_process import EngineSettings, VLLMProcess

    settings = EngineSettings(model=resolve_base_model(None), served_name=DEFAULT_BASE_NAME, max_loras=3,
                              max_cpu_loras=5, kv_cache_gib=1, cpu_threads_bind="0-1", port=port,
                              log_path=home / f"vllm-{name}.log")  # fmt: skip
    engine = VLLMProcess(settings)
    engine.start()
    return engine


async def wait_engines(*engines: Any) -> None:
    async with httpx.AsyncClient() as client:
        await asyncio.gather(*(engine.wait_healthy(client) for engine in engines))


# long: the failover story, one step after another, each timed from the same clock
async def failover(
    home: Path, gateway: str, b: Any, clients: int, max_tokens: int, load_during_restart: bool
) -> tuple[dict[str, Any], Any]:
    """Kill B under load, restart it, then kill it idle; returns the numbers and the last B (to stop)."""
    replica = f"127.0.0.1:{b.port}"
    stop = asyncio.Event()
    loads = [asyncio.create_task(drive(gateway, clients, max_tokens, stop.is_set))]
    t: dict[str, float] = {}
    async with httpx.AsyncClient(timeout=10) as http:
        await asyncio.sleep(3.0)  # both replicas under load
        sent_before = await sent_to(http, gateway, replica)
        t["kill"] = time.monotonic()
        os.killpg(b.pid, signal.SIGKILL)
        out = asyncio.create_task(until(lambda: _not(in_rotation(http, gateway, b.url)), 0.02))
        t["dead"] = await until(lambda: _is(not b.running), 0.005)  # the API server process is gone
        t["out"] = await out
        b.stop()  # reaps the killed process group
        sent_when_out = await sent_to(http, gateway, replica)
        await asyncio.sleep(3.0)  # A alone
        if not load_during_restart:
            stop.set()
            await asyncio.wait(loads)
            stop = asyncio.Event()
        t["restart"] = time.monotonic()
        b = start_engine(home, "B2", port=b.port)
        t["engine_up"] = await until(lambda: _engine_up(http, b.url), 0.1)
        if not load_during_restart:
            loads.append(asyncio.create_task(drive(gateway, clients, max_tokens, stop.is_set)))
        sent_before_rejoin = await sent_to(http, gateway, replica)
        t["in_rotation"] = await until(lambda: in_rotation(http, gateway, b.url), 0.02)
        t["first_request"] = await until(
            lambda: _more(sent_to(http, gateway, replica), sent_before_rejoin), 0.02
        )
        await asyncio.sleep(2.0)  # both again
        stop.set()
        outcomes = [await load for load in loads]
        retries = await _retries(http, gateway)
        t["idle_kill"] = time.monotonic()
        os.killpg(b.pid, signal.SIGKILL)
        t["idle_out"] = await until(lambda: _not(in_rotation(http, gateway, b.url)), 0.02)
        b.stop()
    failed = [failure for outcome in outcomes for failure in outcome.failed]
    numbers = {
        "requests": sum(outcome.ok for outcome in outcomes) + len(failed),
        "failed": len(failed),
        "failures": failed[:10],
        "load_during_restart": load_during_restart,
        "retried_after_broken_connection": retries.get((replica, "broken"), 0.0),
        "sent_to_b_before_kill": sent_before,
        "sent_to_b_between_out_and_rejoin": sent_before_rejoin - sent_when_out,
        "kill_to_api_server_exit_s": round(t["dead"] - t["kill"], 3),
        "kill_to_out_of_rotation_s": round(t["out"] - t["kill"], 3),
        "gateway_log_down": [line[:200] for line in _down_lines(home / "serve-2.log")],
        "restart_to_vllm_up_s": round(t["engine_up"] - t["restart"], 2),
        "vllm_up_to_in_rotation_s": round(t["in_rotation"] - t["engine_up"], 2),
        "restart_to_in_rotation_s": round(t["in_rotation"] - t["restart"], 2),
        "restart_to_first_request_on_b_s": round(t["first_request"] - t["restart"], 2),
        "idle_kill_to_out_of_rotation_s": round(t["idle_out"] - t["idle_kill"], 3),
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
    }
    return numbers, b


def _down_lines(log: Path) -> list[str]:
    """The gateway's log lines saying why a replica left the rotation (first of each outage)."""
    return [line for line in log.read_text(errors="replace").splitlines() if " down: " in line][:4]


async def _is(value: bool) -> bool:
    return value


async def _not(check: Any) -> bool:
    return not await check


async def _more(value: Any, than: float) -> bool:
    return bool(await value > than)


async def _engine_up(http: httpx.AsyncClient, url: str) -> bool:
    return (await http.get(f"{url}/health")).status_code == 200


async def _retries(http: httpx.AsyncClient, gateway: str) -> dict[tuple[str, str], float]:
    from prometheus_client.parser import text_string_to_metric_families

    text = (await http.get(f"{gateway}/metrics", headers=AUTH)).text
    return {
        (sample.labels["replica"], sample.labels["reason"]): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "moea_engine_retries_total"
    }


def main(argv: list[str] | None = None) -> int:  # long: setup, alternating rounds, failover, rows
    parser = standard_parser(__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=None, help="closed-loop clients (default: by size)")
    parser.add_argument("--duration", type=float, default=None, help="seconds per throughput run")
    parser.add_argument("--rounds", type=int, default=None, help="rounds, each one run per configuration")
    parser.add_argument("--max-tokens", type=int, default=8, help="max_tokens of every request")
    parser.add_argument(
        "--load-during-restart", action="store_true", help="keep the load on while B's vLLM starts again"
    )
    args = parser.parse_args(argv)
    size = mode(args)
    plan = SIZES[size]
    clients = int(args.clients or plan["clients"])
    duration = float(args.duration or plan["duration"])
    rounds = int(args.rounds or plan["rounds"])
    if min(clients, rounds, args.max_tokens) < 1 or duration <= 0:
        parser.error("--clients, --rounds and --max-tokens must be >= 1 and --duration > 0")
    from moe_adapters.base_model import DEFAULT_BASE_NAME
    from registry.service import Registry

    runs: dict[str, list[Outcome]] = {"1 replica": [], "2 replicas": []}
    with tempfile.TemporaryDirectory(prefix="moea-bench-replicas-") as tmp:
        home = Path(tmp)
        run1, _ = synthetic_runs(home / "runs")
        registry = Registry(f"sqlite:///{home / 'registry.db'}", home / "store")
        registry.register_run(run1)
        engines = [start_engine(home, "A"), start_engine(home, "B")]
        try:
            asyncio.run(wait_engines(*engines))
            a, b = engines
            common_args = ("--served-model-name", DEFAULT_BASE_NAME, "--no-router-compile")
            one_args = ("--engine-url", a.url, *common_args)
            two_args = ("--engine-url", a.url, "--engine-url", b.url, *common_args)
            with (
                moea_serve(home, *one_args, log_name="serve-1.log") as one,
                moea_serve(home, *two_args, log_name="serve-2.log") as two,
            ):
                gateways = {"1 replica": one, "2 replicas": two}
                for url in gateways.values():  # warm-up: first requests (router, first batches) not timed
                    asyncio.run(drive(url, clients, args.max_tokens, for_seconds(min(duration, 3.0))))
                for index in range(rounds):
                    order = list(gateways) if index % 2 == 0 else list(reversed(gateways))
                    for name in order:
                        outcome = asyncio.run(
                            drive(gateways[name], clients, args.max_tokens, for_seconds(duration))
                        )
                        runs[name].append(outcome)
                        print(f"round {index + 1} {name}: {outcome.ok / outcome.seconds:.2f} req/s, "
                              f"{len(outcome.failed)} failed", flush=True)  # fmt: skip
                kill, b = asyncio.run(
                    failover(home, two, b, clients, args.max_tokens, args.load_during_restart)
                )
                engines[1] = b
        finally:
            for engine in engines:
                engine.stop()
            registry.close()

    rps = {name: statistics.median(o.ok / o.seconds for o in outcomes) for name, outcomes in runs.items()}
    tokens = {
        name: statistics.median(o.tokens / o.seconds for o in outcomes) for name, outcomes in runs.items()
    }
    paired = statistics.median(
        two.ok / two.seconds / (one.ok / one.seconds)
        for one, two in zip(runs["1 replica"], runs["2 replicas"], strict=True)
    )
    throughput_row = summary(
        f"2 vLLM replicas vs 1 on the same cores behind one gateway, {clients} closed-loop clients, "
        f"max_tokens={args.max_tokens} (ratio = paired median over {rounds} rounds, order alternating; no "
        "target: on 2 cores a second replica costs)",
        "requests/s",
        round(rps["2 replicas"], 3),
        round(rps["1 replica"], 3),
        unit="req/s",
        higher_is_better=True,
        baseline_name="1 replica",
    )
    throughput_row["ratio"] = round(paired, 3)
    failover_row = summary(
        f"kill -9 of 1 of 2 replicas under load ({clients} clients), restart on its port: failed requests "
        f"(out of rotation {kill['kill_to_out_of_rotation_s']} s after the kill, serving again "
        f"{kill['restart_to_first_request_on_b_s']} s after the restart)",
        "failed requests",
        kill["failed"],
        None,
        unit="requests",
        higher_is_better=False,
        baseline_name="0 budget",
    )
    failover_row["met"] = kill["failed"] == 0 and kill["sent_to_b_between_out_and_rejoin"] == 0
    failed_load = {name: sum(len(o.failed) for o in outcomes) for name, outcomes in runs.items()}
    result = {
        "mode": size,
        "summary": throughput_row,
        "summaries": [throughput_row, failover_row],
        "moea_flags": " ".join(("--engine-url", "A", "--engine-url", "B", *common_args)),
        "engines": "2 x vLLM CPU, VLLM_CPU_KVCACHE_SPACE=1, VLLM_CPU_OMP_THREADS_BIND=0-1, --max-loras 3",
        "order": "alternating: even rounds run 1 replica first, odd ones 2 replicas first",
        "clients": clients, "duration_s_per_run": duration, "rounds": rounds, "max_tokens": args.max_tokens,
        "throughput_rps": {k: round(v, 3) for k, v in rps.items()},
        "completion_tokens_per_s": {k: round(v, 2) for k, v in tokens.items()},
        "throughput_ratio_paired_median": round(paired, 4),
        "throughput_ratio_of_medians": ratio(rps["2 replicas"], rps["1 replica"]),
        "failed_during_throughput_runs": failed_load,
        "failover": kill,
    }  # fmt: skip
    path = write_result("replicas", result, results_dir=args.results_dir)
    print(f"1 replica {rps['1 replica']:.2f} req/s, 2 replicas {rps['2 replicas']:.2f} req/s (paired ×{paired:.3f}); "
          f"kill: {kill['failed']} of {kill['requests']} failed, out of rotation after {kill['kill_to_out_of_rotation_s']} s "
          f"(idle: {kill['idle_kill_to_out_of_rotation_s']} s), restart → in rotation {kill['restart_to_in_rotation_s']} s "
          f"(vLLM up {kill['restart_to_vllm_up_s']} s) → {path}")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
