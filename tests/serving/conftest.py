"""Fixtures for the serving tests: real run dirs (PEFT LoRA adapters + a trained router), a real SQLite
registry, a real vLLM engine and the gateway running in uvicorn on a free loopback port."""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from registry.local import free_port

TASKS = ("math", "sentiment")
API_KEY = "test-key-123"

_NAMES = ["Tom", "Ana", "Li", "Omar", "Sara", "Jonas", "Priya", "Kenji"]
_ITEMS = ["apples", "books", "marbles", "coins", "pencils", "cookies"]
_PRODUCTS = ["blender", "phone case", "novel", "hotel stay", "laptop", "coffee maker", "headphones"]
_VERDICTS = ["works perfectly", "was a delight", "is worth every penny", "broke after two days",
             "was a total waste of money", "arrived damaged"]  # fmt: skip


def math_prompt(rng: random.Random) -> str:
    """A grade-school arithmetic word problem."""
    name, item, a, b = rng.choice(_NAMES), rng.choice(_ITEMS), rng.randint(2, 60), rng.randint(2, 40)
    return rng.choice([
        f"{name} has {a} {item} and buys {b} more. How many {item} does {name} have now?",
        f"{name} had {a + b} {item} and gave away {b}. How many {item} are left?",
        f"A box holds {b} {item}. {name} fills {a} boxes. How many {item} are there in total?",
    ])  # fmt: skip


def sentiment_prompt(rng: random.Random) -> str:
    """A product review to classify."""
    review = f"The {rng.choice(_PRODUCTS)} {rng.choice(_VERDICTS)}."
    return rng.choice([
        f"Review: {review}\nIs this review positive or negative?",
        f"Classify the sentiment of this review as positive or negative: {review}",
    ])  # fmt: skip


def task_prompts(n: int, seed: int) -> dict[str, list[str]]:
    """`n` prompts per task."""
    rng = random.Random(seed)
    return {
        "math": [math_prompt(rng) for _ in range(n)],
        "sentiment": [sentiment_prompt(rng) for _ in range(n)],
    }


def _write_adapter(base: str, out: Path, seed: int) -> None:
    """A real PEFT LoRA (r=8, q/k/v/o) with random (non-zero) weights: vLLM and PEFT load it."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
    config = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                        init_lora_weights=False, task_type="CAUSAL_LM")  # fmt: skip
    get_peft_model(model, config).save_pretrained(out)


def build_run_dir(
    root: Path, base: str, seed: int, router_dir: Path | None, tasks: tuple[str, ...] = TASKS
) -> Path:
    """A format_version 1 run dir with one adapter per task and a copy of `router_dir` (None: no router)."""
    import shutil

    from moe_adapters.base_model import DEFAULT_BASE_NAME

    for index, task in enumerate(tasks):
        _write_adapter(base, root / "experts" / task, seed * 10 + index)
    if router_dir is not None:
        shutil.copytree(router_dir, root / "router")
    run = {"format_version": 1, "base_model": base, "base_model_name": DEFAULT_BASE_NAME, "base_model_sha256": None,
           "created_at": "2026-01-01T00:00:00+00:00", "mixture_sha256": "0" * 64, "git_commit": None,
           "tasks": {task: {"kind": "generation", "system_prompt": None} for task in tasks}}  # fmt: skip
    (root / "run.json").write_text(json.dumps(run))
    (root / "metrics.json").write_text(json.dumps({"experts": {}, "router": {}, "train": {}}))
    (root / "mixture.yaml").write_text("tasks: []\n")
    return root


@dataclass
class ServingAssets:
    """Base model folder and two run dirs (versions 1 and 2 of every task)."""

    base: str
    run1: Path
    run2: Path


@pytest.fixture(scope="session")
def serving_assets(tmp_path_factory: pytest.TempPathFactory) -> ServingAssets:
    """Built once per test session (~20 s): the converted base model, adapters and a trained router."""
    from moe_adapters.base_model import resolve_base_model
    from moe_adapters.config import RouterSettings
    from moe_adapters.router_training import train_router

    base = resolve_base_model(None)
    root = tmp_path_factory.mktemp("serving-assets")
    router_dir = root / "router"
    train_router(task_prompts(60, seed=0), task_prompts(20, seed=1), router_dir,
                 RouterSettings(encoder="minilm", heads=("linear",)))  # fmt: skip
    return ServingAssets(
        base,
        build_run_dir(root / "run1", base, 1, router_dir),
        build_run_dir(root / "run2", base, 2, router_dir),
    )


class GatewayThread:
    """A gateway app served by uvicorn in a background thread (its own event loop) on a free port (or
    `port`: a fake engine restarted where it was)."""

    def __init__(self, app: Any, startup_timeout_s: float = 600.0, port: int | None = None) -> None:
        import uvicorn

        self.app = app
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", access_log=False)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self._run, name="gateway", daemon=True)
        self.error: BaseException | None = None
        self.thread.start()
        deadline = time.monotonic() + startup_timeout_s
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"gateway did not start: {self.error!r}")
            time.sleep(0.2)

    def _run(self) -> None:
        try:
            asyncio.run(self.server.serve())
        except BaseException as error:  # noqa: BLE001 - reported by the constructor
            self.error = error

    def stop(self) -> None:
        """Graceful shutdown (runs the lifespan: engines stopped, logs flushed)."""
        self.server.should_exit = True
        self.thread.join(timeout=120)


@contextlib.contextmanager
def running_gateway(
    registry_url: str, store_dir: Path, base: str, engine_urls: tuple[str, ...] = (), **config: Any
) -> Iterator[GatewayThread]:
    """Start a gateway that owns a real vLLM engine (or uses the running ones at `engine_urls`, as
    `moea serve --engine-url ...` does); stop it (and its own engine) afterwards."""
    from moe_adapters.base_model import DEFAULT_BASE_NAME
    from registry.service import Registry
    from serving.app import create_app
    from serving.engine import EnginePool
    from serving.gateway import Gateway
    from serving.metrics import GatewayMetrics
    from serving.request_log import RequestLogWriter
    from serving.settings import GatewayConfig
    from serving.vllm_process import EngineSettings

    registry = Registry(registry_url, store_dir)
    settings = EngineSettings(model=base, served_name=DEFAULT_BASE_NAME, max_loras=2, max_cpu_loras=4,
                              cpu_threads_bind="0-1")  # fmt: skip
    client = httpx.AsyncClient(limits=httpx.Limits(max_connections=256, max_keepalive_connections=64))
    metrics = GatewayMetrics()
    if engine_urls:
        pool = EnginePool(client, urls=engine_urls, capacity=settings.adapter_capacity, metrics=metrics)
    else:
        pool = EnginePool(client, settings=settings, metrics=metrics)
    gateway = Gateway(
        GatewayConfig(base_name=DEFAULT_BASE_NAME, poll_interval_s=0.2, **config),
        registry,
        pool,
        request_log=RequestLogWriter(registry, flush_interval_s=0.2, metrics_registry=metrics.registry),
    )
    thread = GatewayThread(create_app(gateway))
    try:
        yield thread
    finally:
        thread.stop()
        registry.close()


def wait_for_experiment(url: str, expert: str, experiment_id: int, timeout_s: float = 60.0) -> None:
    """Until the gateway at `url` serves `expert` through experiment `experiment_id` (its /v1/models card).

    A gateway notices registry changes by polling; a request sent before it noticed a new experiment is
    served and logged without it. On a loaded CI machine that made a test that started an experiment and
    sent at once fail (stops 19 and 20): wait for the gateway, not for the registry."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        cards = httpx.get(f"{url}/v1/models", timeout=10).json()["data"]
        if any(card["id"] == expert and card.get("experiment") == experiment_id for card in cards):
            return
        time.sleep(0.1)
    raise AssertionError(
        f"the gateway did not pick up experiment {experiment_id} of {expert} in {timeout_s} s"
    )
