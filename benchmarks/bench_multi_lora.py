"""Serving throughput with requests spread over 8 experts vs the same load on the base model only.

Question: what does serving 8 LoRA experts behind one endpoint cost compared with serving the base
model alone (target ≥ 0.8× generated tokens/s)? Four arms, same closed-loop load (C clients, the same
prompts, greedy, ``ignore_eos`` so every request generates exactly ``max_tokens`` tokens):

- ``vllm_base`` (the baseline): plain vLLM, no ``--enable-lora``, every request to the base model;
- ``stock_lora_base`` / ``stock_8_loras``: vLLM with ``--enable-lora`` and its own CPU LoRA ops, every
  request to the base model / round-robin over the 8 experts' LoRAs, sent directly;
- ``vllm_lora_base`` / ``vllm_8_loras``: the same with moea's CPU LoRA kernel (serving/cpu_lora.py), as
  ``moea serve`` starts vLLM;
- ``moea_8_experts`` (moea's number): the 8-expert load through ``moea serve`` (model = expert name),
  in front of the kernel engine.

The arms alternate within each round (the order rotates) and the median over rounds is kept, so drift
in machine load hits all arms alike. The two engines run side by side; only one arm sends load at a
time. Adapters are real PEFT LoRAs (r=8 on q/k/v/o) with random weights: serving cost does not depend
on the values.

    .venv/bin/python benchmarks/bench_multi_lora.py [--quick | --smoke] [--clients 8] [--duration 15]
        [--rounds 2] [--max-tokens 32] [--experts 8]

Sizes (the flags override): full 8 clients x 30 s per arm, 3 rounds, 64 tokens; ``--quick`` 8 x 12 s,
2 rounds, 32 tokens; ``--smoke`` 2 x 2 s, 1 round, 4 tokens (checks that it runs).
Writes benchmarks/results/multi_lora.json.
"""

from __future__ import annotations

import asyncio
import itertools
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httpx  # noqa: E402
from bench_serving import KEY, moea_serve  # noqa: E402
from common import mode, ratio, standard_parser, summary, write_result  # noqa: E402

TARGET_RATIO = 0.8
"""moea over 8 experts must generate at least this share of the base-only tokens/s."""

SIZES: dict[str, dict[str, float]] = {
    "smoke": {"clients": 2, "duration": 2.0, "rounds": 1, "max_tokens": 4},
    "quick": {"clients": 8, "duration": 12.0, "rounds": 2, "max_tokens": 32},
    "full": {"clients": 8, "duration": 30.0, "rounds": 3, "max_tokens": 64},
}
"""Default closed-loop clients, seconds per arm and round, rounds, and tokens per request."""

PROMPTS = [
    "Tom has 3 apples and buys 4 more. How many apples does Tom have now?",
    "Review: The laptop broke after two days.\nIs this review positive or negative?",
    "Extract name, age and city: Ana is 34 and lives in Porto.",
    "Rewrite the date 5 March 2024 in ISO format.",
    "Summarise in one sentence: the meeting moved to Thursday because the room was booked.",
    "Translate to French: good morning, my friend.",
    "Write a haiku about autumn rain.",
    "List three uses of a paperclip.",
]
"""Short prompts of different lengths; each client cycles through them from its own offset."""


def expert_run(root: Path, base: str, n_experts: int) -> Path:
    """A run dir with `n_experts` real PEFT adapters (random weights) named expert0..expertN-1, no router."""
    from tests.serving.conftest import build_run_dir

    return build_run_dir(root, base, 10, None, tuple(f"expert{i}" for i in range(n_experts)))


async def load(
    url: str,
    models: list[str],
    clients: int,
    duration_s: float,
    max_tokens: int,
    headers: dict[str, str],
    shared_cycle: Iterator[int] | None = None,
) -> dict[str, float]:
    """Closed-loop load: each client sends chat requests back to back, cycling through `models` from its own
    offset; with `shared_cycle` every request takes the next index of that one counter instead, so that
    consecutive requests (of all clients, across calls) go to consecutive models and every model is used.

    Returns generated tokens/s (from each response's usage), requests/s, failures and the p50/p95 latency
    (ms) of the answered requests."""
    tokens = requests = failures = 0
    latencies: list[float] = []
    stop_at = time.monotonic() + duration_s
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=300, limits=limits) as client:

        async def worker(offset: int) -> None:
            nonlocal tokens, requests, failures
            cycle = shared_cycle if shared_cycle is not None else itertools.count(offset)
            while time.monotonic() < stop_at:
                i = next(cycle)
                body = {
                    "model": models[i % len(models)],
                    "messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
                    "max_tokens": max_tokens,
                    "temperature": 0.0,
                    "ignore_eos": True,
                }
                sent = time.monotonic()
                response = await client.post("/v1/chat/completions", json=body)
                if response.status_code != 200:
                    failures += 1
                    continue
                latencies.append((time.monotonic() - sent) * 1000.0)
                tokens += response.json()["usage"]["completion_tokens"]
                requests += 1

        started = time.monotonic()
        await asyncio.gather(*(worker(i) for i in range(clients)))
        wall = time.monotonic() - started
    cuts = statistics.quantiles(latencies, n=20, method="inclusive") if len(latencies) > 1 else latencies * 19
    return {
        "tokens_per_s": tokens / wall, "requests_per_s": requests / wall, "failures": failures,
        "p50_ms": statistics.median(latencies) if latencies else float("nan"),
        "p95_ms": cuts[18] if cuts else float("nan"),
    }  # fmt: skip


async def wait_healthy_all(*engines: Any) -> None:
    async with httpx.AsyncClient() as client:
        await asyncio.gather(*(engine.wait_healthy(client) for engine in engines))


async def _load_adapters(url: str, adapters: dict[str, Path]) -> None:
    """Register LoRAs with a vLLM server through its runtime API (what the gateway does for its engine)."""
    async with httpx.AsyncClient(base_url=url, timeout=120) as client:
        for name, path in adapters.items():
            body = {"lora_name": name, "lora_path": str(path)}
            (await client.post("/v1/load_lora_adapter", json=body)).raise_for_status()


def main(argv: list[str] | None = None) -> int:
    parser = standard_parser(__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=None, help="closed-loop clients (default: by size)")
    parser.add_argument(
        "--duration", type=float, default=None, help="seconds per arm and round (default: by size)"
    )
    parser.add_argument("--rounds", type=int, default=None, help="rounds over all arms (default: by size)")
    parser.add_argument(
        "--max-tokens", type=int, default=None, help="tokens generated per request (default: by size)"
    )
    parser.add_argument("--experts", type=int, default=8, help="LoRA experts the load is spread over")
    parser.add_argument("--cpu-threads-bind", default="0-1", help="VLLM_CPU_OMP_THREADS_BIND of both engines ('' = vLLM's default)")  # fmt: skip
    args = parser.parse_args(argv)
    plan = SIZES[mode(args)]
    clients = int(args.clients or plan["clients"])
    duration = args.duration or plan["duration"]
    rounds = int(args.rounds or plan["rounds"])
    max_tokens = int(args.max_tokens or plan["max_tokens"])
    if min(clients, rounds, max_tokens, args.experts) < 1 or duration <= 0:
        parser.error("--clients, --rounds, --max-tokens and --experts must be >= 1 and --duration > 0")
    from moe_adapters.base_model import DEFAULT_BASE_NAME, resolve_base_model
    from registry.service import Registry
    from serving.vllm_process import EngineSettings, VLLMProcess

    base = resolve_base_model(None)
    bind = args.cpu_threads_bind or None
    results: dict[str, list[dict[str, float]]] = {}
    with tempfile.TemporaryDirectory(prefix="moea-bench-multi-lora-") as tmp:
        home = Path(tmp)
        registry = Registry(f"sqlite:///{home / 'registry.db'}", home / "store")
        experts = registry.register_run(expert_run(home / "run", base, args.experts)).experts
        registry.close()
        common = {"model": base, "served_name": DEFAULT_BASE_NAME, "cpu_threads_bind": bind}
        lora_args = {"max_loras": args.experts, "max_cpu_loras": args.experts}
        engines = {
            "plain": VLLMProcess(
                EngineSettings(**common, enable_lora=False, log_path=home / "vllm-plain.log")
            ),
            "stock": VLLMProcess(
                EngineSettings(**common, **lora_args, cpu_lora_kernel=False, log_path=home / "vllm-stock.log")
            ),  # fmt: skip
            "kernel": VLLMProcess(EngineSettings(**common, **lora_args, log_path=home / "vllm-kernel.log")),
        }
        for engine in engines.values():
            engine.start()
        try:
            asyncio.run(wait_healthy_all(*engines.values()))
            asyncio.run(
                _load_adapters(
                    engines["stock"].url, {e.ref: home / "run" / "experts" / e.name for e in experts}
                )
            )
            # The kernel engine needs no base-LoRA guard: base rows batched with LoRA rows stay base.
            serve_args = ("--engine-url", engines["kernel"].url, "--served-model-name", DEFAULT_BASE_NAME,
                          "--max-loras", str(args.experts), "--no-base-lora-guard")  # fmt: skip
            with moea_serve(home, *serve_args) as gateway_url:
                auth = {"Authorization": f"Bearer {KEY}"}
                refs = [e.ref for e in experts]
                arms: dict[str, tuple[str, list[str], dict[str, str]]] = {
                    "vllm_base": (engines["plain"].url, [DEFAULT_BASE_NAME], {}),
                    "stock_lora_base": (engines["stock"].url, [DEFAULT_BASE_NAME], {}),
                    "stock_8_loras": (engines["stock"].url, refs, {}),
                    "vllm_lora_base": (engines["kernel"].url, [DEFAULT_BASE_NAME], {}),
                    "vllm_8_loras": (engines["kernel"].url, refs, {}),
                    "moea_8_experts": (gateway_url, [e.name for e in experts], auth),
                }
                # Warm-up (connections, caches; moea first: the gateway is what loads the LoRAs into vLLM).
                for url, models, headers in reversed(arms.values()):
                    asyncio.run(load(url, models, clients, 1.0, 2, headers))
                names = list(arms)
                for r in range(rounds):
                    for name in names[r % len(names) :] + names[: r % len(names)]:
                        url, models, headers = arms[name]
                        result = asyncio.run(load(url, models, clients, duration, max_tokens, headers))
                        results.setdefault(name, []).append(result)
                        print(f"round {r + 1}/{rounds} {name}: {result['tokens_per_s']:.1f} tok/s, "
                              f"{result['requests_per_s']:.2f} req/s, {result['failures']} failed", flush=True)  # fmt: skip
        finally:
            for engine in engines.values():
                engine.stop()

    tok = {name: statistics.median(r["tokens_per_s"] for r in runs) for name, runs in results.items()}
    failed = sum(r["failures"] for runs in results.values() for r in runs)
    row = summary(
        f"serving throughput, {clients} clients spread over {args.experts} experts via moea vs the base model "
        f"on plain vLLM, {max_tokens} tokens/request",
        "generated tokens/s",
        round(tok["moea_8_experts"], 2),
        round(tok["vllm_base"], 2),
        unit="tok/s",
        higher_is_better=True,
        target=TARGET_RATIO,
        baseline_name="base model, plain vLLM",
    )
    # Paired: each round measured both arms (in rotating order), so the ratio is the median of per-round ratios.
    paired = statistics.median(
        m["tokens_per_s"] / b["tokens_per_s"]
        for m, b in zip(results["moea_8_experts"], results["vllm_base"], strict=True)
    )
    row["ratio"], row["met"] = round(paired, 3), paired >= TARGET_RATIO and not failed
    result = {
        "mode": mode(args),
        "summary": row,
        # The flags the moea side ran with (README rows show them): no base-LoRA guard, see above.
        "moea_flags": " ".join(serve_args[2:]),
        "ratio_paired_median_over_rounds": round(paired, 4),
        "clients": clients, "duration_s_per_arm": duration, "rounds": rounds, "max_tokens": max_tokens,
        "experts": args.experts, "failed_requests": failed,
        "tokens_per_s": {name: round(value, 2) for name, value in tok.items()},
        "ratios_to_vllm_base": {name: ratio(value, tok["vllm_base"]) for name, value in tok.items()},
        "kernel_speedup_8_loras": ratio(tok["vllm_8_loras"], tok["stock_8_loras"]),
        "kernel_speedup_base_requests": ratio(tok["vllm_lora_base"], tok["stock_lora_base"]),
        "runs": results,
    }  # fmt: skip
    path = write_result("multi_lora", result, results_dir=args.results_dir)
    print("tokens/s: " + ", ".join(f"{k} {v:.1f} (×{result['ratios_to_vllm_base'][k]})" for k, v in tok.items())
          + f"; {failed} failed → {path}")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
