"""Serving vs the number of distinct adapters in the traffic: `moea serve` over 1 … 64 expert versions.

Question (issue 14's first curve): how do throughput and latency through `moea serve` change when a
round-robin load (C closed-loop clients) is spread over 1, 2, 4, 8, 16, 32, 64 distinct expert versions
(versions 1…N of one expert, requested pinned as ``model="expert@v"``), with ``--max-loras SLOTS``
smaller than the larger counts (adapters then swap in and out of the engine),
against plain vLLM serving the base model under the same load (target: ≥ 0.5× at 64 versions and 8
slots)? The same engine settings as ``bench_multi_lora.py`` (moea's CPU LoRA kernel, no base-LoRA guard);
vLLM's ``--max-loras`` and ``--max-cpu-loras`` are SLOTS, and so is the gateway's ``--max-loras``.

For every count, each round measures both arms, in alternating order (base first in even rounds, moea
first in odd ones), and the ratio is the median of the per-round ratios. The gateway's adapter loads and
unloads during the moea arm (its ``/metrics``) show the swapping. Adapters are real PEFT LoRAs (r=8 on
q/k/v/o) with random weights: serving cost does not depend on the values.

    .venv/bin/python benchmarks/bench_adapter_curve.py [--quick | --smoke] [--counts 1,2,4,8,16,32,64]
        [--slots 8] [--clients 8] [--duration 8] [--rounds 2] [--max-tokens 32]

Sizes (the flags override): full 8 clients x 20 s per arm, 2 rounds, 32 tokens, counts 1…64, 8 slots;
``--quick`` 8 x 8 s, 2 rounds, 16 tokens; ``--smoke`` counts 1 and 3 with 2 slots, 2 clients x 2 s, 1
round, 4 tokens (checks that it runs). Writes benchmarks/results/adapter_curve.json and its plot.
"""

from __future__ import annotations

import asyncio
import itertools
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httpx  # noqa: E402
from bench_multi_lora import load, wait_healthy_all  # noqa: E402
from bench_serving import KEY, moea_serve  # noqa: E402
from common import curve, mode, pyplot, save_plot, standard_parser, summary, write_result  # noqa: E402

EXPERT = "expert"
"""The one expert whose versions make the traffic."""

TARGET_RATIO = 0.5
"""moea over the largest count must generate at least this share of the base-only tokens/s."""

SIZES: dict[str, dict[str, Any]] = {
    "smoke": {"clients": 2, "duration": 2.0, "rounds": 1, "max_tokens": 4, "counts": [1, 3], "slots": 2},
    "quick": {
        "clients": 8,
        "duration": 8.0,
        "rounds": 2,
        "max_tokens": 16,
        "counts": [1, 2, 4, 8, 16, 32, 64],
        "slots": 8,
    },  # fmt: skip
    "full": {
        "clients": 8,
        "duration": 20.0,
        "rounds": 2,
        "max_tokens": 32,
        "counts": [1, 2, 4, 8, 16, 32, 64],
        "slots": 8,
    },  # fmt: skip
}
"""Default clients, seconds per arm and round, rounds, tokens per request, adapter counts and slots."""


def register_versions(registry: Any, home: Path, base: str, count: int) -> list[str]:
    """Versions 1..count of one expert, each a run dir with its own random LoRA; their pinned model names.

    One expert, so that only its serving version (the latest) must stay loaded: the gateway refuses a
    --max-loras below the number of serving versions, and the other versions, addressed as ``expert@v``,
    are loaded on demand and evicted least-recently-used: the swapping this curve measures."""
    from tests.serving.conftest import build_run_dir

    for version in range(1, count + 1):
        registry.register_run(build_run_dir(home / f"run{version}", base, version, None, (EXPERT,)))
    return [f"{EXPERT}@{version}" for version in range(1, count + 1)]


async def adapter_operations(url: str) -> dict[str, float]:
    """The gateway's successful adapter loads and unloads so far (its Prometheus counters)."""
    from prometheus_client.parser import text_string_to_metric_families

    async with httpx.AsyncClient(timeout=30) as client:
        text = (await client.get(f"{url}/metrics", headers={"Authorization": f"Bearer {KEY}"})).text
    counts = {"load": 0.0, "unload": 0.0}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "moea_adapter_operations_total" and sample.labels.get("outcome") == "ok":
                counts[sample.labels["operation"]] = (
                    counts.get(sample.labels["operation"], 0.0) + sample.value
                )
    return counts


def measure_count(
    gateway: str, base_url: str, names: list[str], rounds: int, load_args: tuple[int, float, int]
) -> dict[str, Any]:
    """Both arms for one adapter count; the moea arm's runs carry the adapter loads/unloads they caused."""
    from moe_adapters.base_model import DEFAULT_BASE_NAME

    auth = {"Authorization": f"Bearer {KEY}"}
    # One round-robin counter for all clients and arms: consecutive requests go to consecutive versions and
    # every version is requested (per-client offsets would keep ~2 x clients versions in use whatever N is).
    cycle = itertools.count()
    asyncio.run(load(gateway, names, load_args[0], 1.0, 2, auth, cycle))  # warm-up: the first adapters load
    runs: dict[str, list[dict[str, Any]]] = {"vllm_base": [], "moea": []}
    for r in range(rounds):
        for arm in ("vllm_base", "moea") if r % 2 == 0 else ("moea", "vllm_base"):
            if arm == "vllm_base":
                runs[arm].append(asyncio.run(load(base_url, [DEFAULT_BASE_NAME], *load_args, {})))
                continue
            before = asyncio.run(adapter_operations(gateway))
            result = asyncio.run(load(gateway, names, *load_args, auth, cycle))
            after = asyncio.run(adapter_operations(gateway))
            result.update(loads=after["load"] - before["load"], unloads=after["unload"] - before["unload"])
            runs[arm].append(result)
    return runs


def row(count: int, runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Medians of one count's runs and the paired ratio."""
    moea, base = runs["moea"], runs["vllm_base"]
    loads = statistics.median(r["loads"] for r in moea)
    return {
        "count": count,
        "moea_tokens_per_s": round(statistics.median(r["tokens_per_s"] for r in moea), 2),
        "base_tokens_per_s": round(statistics.median(r["tokens_per_s"] for r in base), 2),
        "ratio_paired": round(
            statistics.median(m["tokens_per_s"] / b["tokens_per_s"] for m, b in zip(moea, base, strict=True)),
            3,
        ),
        "moea_p50_ms": round(statistics.median(r["p50_ms"] for r in moea), 1),
        "moea_p95_ms": round(statistics.median(r["p95_ms"] for r in moea), 1),
        "base_p50_ms": round(statistics.median(r["p50_ms"] for r in base), 1),
        "loads_per_arm": loads,
        "failures": sum(r["failures"] for r in moea + base),
        "runs": runs,
    }


def plot(rows: list[dict[str, Any]], slots: int, results_dir: Path | None) -> Path:
    """Ratio to base and moea p50/p95 latency against the number of distinct adapters (log2 x axis)."""
    plt = pyplot()
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    counts = [r["count"] for r in rows]
    left.plot(counts, [r["ratio_paired"] for r in rows], marker="o")
    left.axhline(
        TARGET_RATIO, color="grey", linestyle=":", label=f"target {TARGET_RATIO}× at the largest count"
    )
    left.axvline(slots, color="red", linestyle="--", label=f"--max-loras {slots}")
    left.set(xscale="log", xlabel="distinct adapters in the traffic", ylabel="tokens/s vs plain vLLM base")
    left.legend()
    for key, label in (("moea_p50_ms", "moea p50"), ("moea_p95_ms", "moea p95"), ("base_p50_ms", "base p50")):
        right.plot(counts, [r[key] for r in rows], marker="o", label=label)
    right.axvline(slots, color="red", linestyle="--")
    right.set(xscale="log", xlabel="distinct adapters in the traffic", ylabel="request latency ms")
    right.legend()
    for axis in (left, right):
        axis.set_xticks(counts, [str(c) for c in counts])
    return save_plot(figure, "adapter_curve", results_dir)


def main(argv: list[str] | None = None) -> int:
    parser = standard_parser(__doc__.splitlines()[0])
    parser.add_argument("--counts", default=None, help="comma-separated adapter counts (default: by size)")
    parser.add_argument("--slots", type=int, default=None, help="--max-loras of vLLM and the gateway")
    parser.add_argument("--clients", type=int, default=None, help="closed-loop clients (default: by size)")
    parser.add_argument("--duration", type=float, default=None, help="seconds per arm and round")
    parser.add_argument("--rounds", type=int, default=None, help="rounds per count (default: by size)")
    parser.add_argument("--max-tokens", type=int, default=None, help="tokens generated per request")
    parser.add_argument("--cpu-threads-bind", default="0-1", help="VLLM_CPU_OMP_THREADS_BIND of both engines ('' = vLLM's default)")  # fmt: skip
    args = parser.parse_args(argv)
    plan = SIZES[mode(args)]
    counts = sorted({int(c) for c in args.counts.split(",")}) if args.counts else list(plan["counts"])
    slots = int(args.slots or plan["slots"])
    clients, rounds = int(args.clients or plan["clients"]), int(args.rounds or plan["rounds"])
    duration, max_tokens = args.duration or plan["duration"], int(args.max_tokens or plan["max_tokens"])
    if min(counts + [slots, clients, rounds, max_tokens]) < 1 or duration <= 0:
        parser.error("--counts, --slots, --clients, --rounds and --max-tokens must be >= 1, --duration > 0")
    from moe_adapters.base_model import DEFAULT_BASE_NAME, resolve_base_model
    from registry.service import Registry
    from serving.vllm_process import EngineSettings, VLLMProcess

    base = resolve_base_model(None)
    bind = args.cpu_threads_bind or None
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="moea-bench-adapter-curve-") as tmp:
        home = Path(tmp)
        registry = Registry(f"sqlite:///{home / 'registry.db'}", home / "store")
        names = register_versions(registry, home, base, max(counts))
        registry.close()
        common = {"model": base, "served_name": DEFAULT_BASE_NAME, "cpu_threads_bind": bind}
        engines = {
            "plain": VLLMProcess(EngineSettings(**common, enable_lora=False, log_path=home / "vllm-plain.log")),
            "kernel": VLLMProcess(
                EngineSettings(**common, max_loras=slots, max_cpu_loras=slots, log_path=home / "vllm-kernel.log")
            ),
        }  # fmt: skip
        for engine in engines.values():
            engine.start()
        serve_args = ("--engine-url", engines["kernel"].url, "--served-model-name", DEFAULT_BASE_NAME,
                      "--max-loras", str(slots), "--no-base-lora-guard")  # fmt: skip
        try:
            asyncio.run(wait_healthy_all(*engines.values()))
            with moea_serve(home, *serve_args) as gateway:
                for count in counts:
                    runs = measure_count(
                        gateway, engines["plain"].url, names[:count], rounds, (clients, duration, max_tokens)
                    )
                    rows.append(row(count, runs))
                    last = rows[-1]
                    print(f"{count} adapters: moea {last['moea_tokens_per_s']:.1f} tok/s vs base "
                          f"{last['base_tokens_per_s']:.1f} (×{last['ratio_paired']}), p50 {last['moea_p50_ms']:.0f} ms, "
                          f"{last['loads_per_arm']:.0f} loads per arm, {last['failures']} failed", flush=True)  # fmt: skip
        finally:
            for engine in engines.values():
                engine.stop()

    largest = rows[-1]
    head = summary(
        f"serving throughput with {largest['count']} distinct expert versions in the traffic and {slots} slots "
        f"via moea vs the base model on plain vLLM, {clients} clients, {max_tokens} tokens/request",
        "generated tokens/s",
        largest["moea_tokens_per_s"],
        largest["base_tokens_per_s"],
        unit="tok/s",
        higher_is_better=True,
        target=TARGET_RATIO,
        baseline_name="base model, plain vLLM",
    )
    failed = sum(r["failures"] for r in rows)
    head["ratio"], head["met"] = (
        largest["ratio_paired"],
        largest["ratio_paired"] >= TARGET_RATIO and not failed,
    )
    columns = ["adapters", "moea tok/s", "base tok/s", "ratio (paired)", "moea p50 ms", "moea p95 ms",
               "base p50 ms", "adapter loads per arm", "failed"]  # fmt: skip
    keys = ["count", "moea_tokens_per_s", "base_tokens_per_s", "ratio_paired", "moea_p50_ms", "moea_p95_ms",
            "base_p50_ms", "loads_per_arm", "failures"]  # fmt: skip
    result = {
        "mode": mode(args),
        "summary": head,
        "moea_flags": " ".join(serve_args[2:]),
        "slots": slots, "clients": clients, "duration_s_per_arm": duration, "rounds": rounds,
        "max_tokens": max_tokens, "failed_requests": failed,
        "curve": curve(
            f"Serving vs distinct adapters in the traffic (`moea serve --max-loras {slots}`, CPU LoRA kernel, "
            f"{clients} clients, {max_tokens} tokens/request; base = plain vLLM, same load)",
            columns, [[r[k] for k in keys] for r in rows],
        ),
        "rows": rows,
    }  # fmt: skip
    path = write_result("adapter_curve", result, results_dir=args.results_dir)
    plot(rows, slots, args.results_dir)
    print(
        f"largest count {largest['count']}: ×{largest['ratio_paired']} of base (target {TARGET_RATIO}) → {path}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
