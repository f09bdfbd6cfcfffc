"""Router latency and accuracy: p50/p99 per request at batch 1 and 32, on CPU (and GPU when present).

Question (issue 7): is routing cheap enough to sit in front of every request? Target: p50 ≤ 5 ms per
request at batch 1 on CPU. The router is trained here with ``moe_adapters.router_training.train_router`` on the
example mixture's prompts (80/10/10 split per task, seeded), then timed with ``Router.route``.
Accuracy is measured on the held-out test prompts of the easy and the hard example mixtures against
the TF-IDF + logistic-regression baseline fitted on the same split, and out-of-distribution handling
on ``examples/ood_prompts.jsonl`` (share sent to the base model).

    python benchmarks/bench_router.py --quick    # minilm encoder, easy + hard mixtures
    python benchmarks/bench_router.py            # more repeats
    python benchmarks/bench_router.py --smoke    # easy mixture, few repeats (CI)
"""

from __future__ import annotations

import csv
import json
import os
import random
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (
    REPO_ROOT,
    machine_info,
    mode,
    percentile,
    standard_parser,
    summary,
    time_calls,
    write_result,
)  # noqa: E402, I001

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

EXAMPLES = REPO_ROOT / "examples"
TARGET_P50_MS = 5.0
SIZES = {
    "smoke": {"mixtures": ["mixture.yaml"], "repeats": {1: 10, 32: 3}, "max_train_per_task": 60},
    "quick": {
        "mixtures": ["mixture.yaml", "hard/mixture.yaml"],
        "repeats": {1: 100, 32: 20},
        "max_train_per_task": 2000,
    },
    "full": {
        "mixtures": ["mixture.yaml", "hard/mixture.yaml"],
        "repeats": {1: 500, 32: 100},
        "max_train_per_task": 2000,
    },
}


def _rows(path: Path) -> list[dict[str, str]]:
    if path.suffix == ".csv":
        with path.open(newline="", encoding="utf-8") as handle:
            return list(csv.DictReader(handle))
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def split_prompts(mixture: Path, seed: int = 13) -> dict[str, dict[str, list[str]]]:
    """``{"train"|"val"|"test": {task: prompts}}`` for the expert tasks of ``mixture`` (80/10/10)."""
    import yaml

    raw = yaml.safe_load(mixture.read_text())
    splits: dict[str, dict[str, list[str]]] = {"train": {}, "val": {}, "test": {}}
    for task in raw["tasks"]:
        if task.get("replay"):
            continue
        prompts = [r["prompt"] for f in task["files"] for r in _rows(mixture.parent / f)]
        random.Random(f"{seed}:{task['name']}").shuffle(prompts)
        n_val = n_test = len(prompts) // 10
        splits["test"][task["name"]] = prompts[:n_test]
        splits["val"][task["name"]] = prompts[n_test : n_test + n_val]
        splits["train"][task["name"]] = prompts[n_test + n_val :]
    return splits


def routing_accuracy(router: Any, test: dict[str, list[str]]) -> dict[str, float]:
    """Share of test prompts routed to their own task, and share abstained (→ base)."""
    prompts = [p for ps in test.values() for p in ps]
    truth = [t for t, ps in test.items() for _ in ps]
    decisions = router.route(prompts)
    correct = sum(d.label == t for d, t in zip(decisions, truth, strict=True))
    abstained = sum(d.label is None for d in decisions)
    return {"accuracy": round(correct / len(prompts), 4), "abstained": round(abstained / len(prompts), 4)}


def tfidf_test_accuracy(train: dict[str, list[str]], test: dict[str, list[str]]) -> float:
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    x = [p for ps in train.values() for p in ps]
    y = [t for t, ps in train.items() for _ in ps]
    vectorizer = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True)
    model = LogisticRegression(max_iter=2000).fit(vectorizer.fit_transform(x), y)
    tx = [p for ps in test.values() for p in ps]
    ty = [t for t, ps in test.items() for _ in ps]
    return round(float((model.predict(vectorizer.transform(tx)) == ty).mean()), 4)


def latency(router: Any, prompts: list[str], repeats: dict[int, int]) -> dict[str, dict[str, float]]:
    """p50/p99 wall ms per ``route`` call and per request, for each batch size."""
    router.route(prompts[:4])  # warm-up: allocations, lazy init
    out: dict[str, dict[str, float]] = {}
    rng = random.Random(0)
    for size, n in repeats.items():
        batches = [rng.sample(prompts, size) for _ in range(n)]
        it = iter(batches)
        timing = time_calls(lambda it=it: router.route(next(it)), n)
        ms = [s * 1000 for s in timing.seconds]
        out[str(size)] = {
            "p50_ms": round(percentile(ms, 50), 3),
            "p99_ms": round(percentile(ms, 99), 3),
            "p50_ms_per_request": round(percentile(ms, 50) / size, 3),
            "n": n,
        }
    return out


def measure(
    mixture_rel: str, plan: dict[str, Any], devices: list[str], compile_cpu: bool = False
) -> dict[str, Any]:
    """Train one router for ``mixture_rel`` and measure accuracy (+ latency on each device).

    With ``compile_cpu``, the CPU router is then compiled as ``moea serve`` does (Router.compile_for_cpu)
    and measured again: latency under ``cpu-compiled``, plus its test accuracy and OOD share."""
    from moe_adapters.router import Router
    from moe_adapters.router_training import train_router

    splits = split_prompts(EXAMPLES / mixture_rel)
    ood = [r["prompt"] for r in _rows(EXAMPLES / "ood_prompts.jsonl")]
    settings = {"encoder": "minilm", "max_train_per_task": plan["max_train_per_task"]}
    with tempfile.TemporaryDirectory(prefix="moea-bench-router-") as tmp:
        metrics = train_router(splits["train"], splits["val"], Path(tmp) / "router", settings)
        result: dict[str, Any] = {
            "mixture": mixture_rel,
            "head": metrics.get("head"),
            "threshold": metrics.get("threshold"),
            "val_accuracy": metrics.get("val_accuracy"),
            "tfidf_test_accuracy": tfidf_test_accuracy(splits["train"], splits["test"]),
            "latency": {},
        }
        for device in devices:
            router = Router.load(Path(tmp) / "router", device=device)
            if device == devices[0]:
                result["test"] = routing_accuracy(router, splits["test"])
                result["ood_to_base"] = round(sum(d.label is None for d in router.route(ood)) / len(ood), 4)
            pool = [p for ps in splits["test"].values() for p in ps]
            result["latency"][device] = latency(router, pool, plan["repeats"])
            if device == "cpu" and compile_cpu:
                result["compile_s"] = round(router.compile_for_cpu(), 1)
                result["latency"]["cpu-compiled"] = latency(router, pool, plan["repeats"])
                result["test_compiled"] = routing_accuracy(router, splits["test"])
                result["ood_to_base_compiled"] = round(
                    sum(d.label is None for d in router.route(ood)) / len(ood), 4
                )
    cpu = result["latency"].get("cpu-compiled", result["latency"]["cpu"])
    print(
        f"{mixture_rel}: test accuracy {result['test']['accuracy']:.3f} (tfidf {result['tfidf_test_accuracy']:.3f}), "
        f"OOD→base {result['ood_to_base']:.2f}, cpu p50 batch1 {cpu['1']['p50_ms']:.2f} ms "
        f"p99 {cpu['1']['p99_ms']:.2f} ms, batch32 {cpu['32']['p50_ms_per_request']:.2f} ms/request"
    )
    return result


def main(argv: list[str] | None = None) -> int:
    parser = standard_parser(__doc__.splitlines()[0])
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: torch's; 1 on a busy CPU)."
    )
    args = parser.parse_args(argv)
    size = mode(args)
    plan = SIZES[size]
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)

    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    results = [measure(m, plan, devices, compile_cpu=i == 0) for i, m in enumerate(plan["mixtures"])]
    easy = results[0]
    p50 = easy["latency"]["cpu-compiled"]["1"]["p50_ms"]
    plain_p50 = easy["latency"]["cpu"]["1"]["p50_ms"]
    summaries = [
        summary(
            "router p50 per request, batch 1, CPU, as `moea serve` runs it (bf16 + torch.compile)",
            "p50 latency",
            p50,
            TARGET_P50_MS,
            unit="ms",
            higher_is_better=False,
            target=1.0,
            baseline_name="5 ms budget",
        ),
        summary(
            "router p50, batch 1, CPU: compiled vs the plain float32 encoder",
            "p50 latency",
            p50,
            plain_p50,
            unit="ms",
            higher_is_better=False,
            baseline_name="plain float32 encoder",
        ),
    ]
    for item in results:
        summaries.append(
            summary(
                f"routing accuracy ({item['mixture']})",
                "test accuracy",
                item["test"]["accuracy"],
                item["tfidf_test_accuracy"],
                unit="share",
                higher_is_better=True,
                target=1.0,
                baseline_name="TF-IDF+logreg",
            )
        )
    payload = {
        "mode": size,
        "devices": devices,
        "results": results,
        "summaries": summaries,
        "summary": summaries[0],
        "machine": machine_info(),
    }
    path = write_result("router", payload, results_dir=args.results_dir)
    print(
        f"plain encoder p50 {plain_p50:.2f} ms, compiled p50 {p50:.2f} ms at batch 1 on CPU ({'meets' if p50 <= TARGET_P50_MS else 'MISSES'} "
        f"the ≤{TARGET_P50_MS} ms target); wrote {path}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
