"""Registry state changes reach traffic as a whole (serving/state_swap.py), measured.

The gateway is real (uvicorn, real SQLite registry, the real `openai` client); the engine behind it is a
*fake* vLLM (:class:`FakeVLLM`, a tiny FastAPI app, not vLLM) whose `load_lora_adapter` is slow and
loads one adapter at a time, like vLLM. What is tested is the gateway's own behaviour: which versions
answer while a new state loads and after it is swapped in.
"""

from __future__ import annotations

import asyncio
import logging
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from registry.service import Registry

from .conftest import GatewayThread
from .registry_fixtures import make_run_dir

BASE = "SmolLM2-135M-Instruct"
EXPERTS = [f"task{i}" for i in range(6)]
LOAD_DELAY_S = 0.3


class FakeVLLM:
    """A fake vLLM OpenAI server (not vLLM): `/health`, `/v1/models`, a slow `/v1/load_lora_adapter`
    (one load at a time; a load waits while `gate` is clear), `/v1/unload_lora_adapter`, and
    `/v1/chat/completions` answering with the name of the adapter it was asked for (404 for a name that
    is not loaded, as vLLM does)."""

    def __init__(self) -> None:
        self.loaded: dict[str, str] = {}
        self.requested: list[str] = []  # adapters asked for, in order (also those still loading)
        self.loads: list[tuple[str, float]] = []  # (adapter, time.monotonic() when its load finished)
        self.not_loaded: list[str] = []  # chat requests for adapters the fake did not have
        self.gate = threading.Event()
        self.gate.set()
        self.app = FastAPI()
        lock: asyncio.Lock | None = None

        @self.app.get("/health")
        async def health() -> dict[str, str]:
            return {}

        @self.app.get("/v1/models")
        async def models() -> dict[str, Any]:
            cards = [{"id": BASE, "root": BASE, "parent": None}]
            cards += [{"id": name, "root": path, "parent": BASE} for name, path in self.loaded.items()]
            return {"object": "list", "data": cards}

        @self.app.post("/v1/load_lora_adapter")
        async def load(request: Request) -> JSONResponse:
            nonlocal lock
            body = await request.json()
            self.requested.append(body["lora_name"])
            lock = lock or asyncio.Lock()
            async with lock:
                while not self.gate.is_set():
                    await asyncio.sleep(0.01)
                await asyncio.sleep(LOAD_DELAY_S)
                self.loaded[body["lora_name"]] = body["lora_path"]
                self.loads.append((body["lora_name"], time.monotonic()))
            return JSONResponse("Success")

        @self.app.post("/v1/unload_lora_adapter")
        async def unload(request: Request) -> JSONResponse:
            self.loaded.pop((await request.json())["lora_name"], None)
            return JSONResponse("Success")

        @self.app.post("/v1/chat/completions")
        async def chat(request: Request) -> JSONResponse:
            model = (await request.json())["model"]
            if model != BASE and model not in self.loaded:
                self.not_loaded.append(model)
                return JSONResponse({"error": {"message": f"The model `{model}` does not exist."}}, 404)
            message = {"role": "assistant", "content": model}
            return JSONResponse(
                {"id": "chatcmpl-fake", "object": "chat.completion", "created": 0, "model": model,
                 "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
                 "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}
            )  # fmt: skip


@dataclass
class Traffic:
    """Clients sending `model=<expert>` in a loop; every answer as (sent, received, x-moea-expert)."""

    url: str
    answers: list[tuple[float, float, str]] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self, expert: str) -> None:
        client = openai.OpenAI(base_url=f"{self.url}/v1", api_key="none", max_retries=0, timeout=30)
        while not self.stop.is_set():
            sent = time.monotonic()
            try:
                raw = client.chat.completions.with_raw_response.create(
                    model=expert, messages=[{"role": "user", "content": "hi"}], max_tokens=1
                )
                self.answers.append((sent, time.monotonic(), raw.headers["x-moea-expert"]))
            except Exception as error:  # noqa: BLE001 - collected, asserted empty
                self.failures.append(repr(error))
            time.sleep(0.01)


@pytest.fixture
def served(registry_url: str, tmp_path: Path) -> Iterator[tuple[Registry, Any, FakeVLLM, GatewayThread]]:
    from serving.app import create_app
    from serving.engine import EnginePool
    from serving.gateway import Gateway
    from serving.settings import GatewayConfig

    registry = Registry(registry_url, tmp_path / "store")
    registry.register_run(make_run_dir(tmp_path, EXPERTS, seed=1))  # first registration: prod → v1
    fake = FakeVLLM()
    engine = GatewayThread(fake.app)
    pool = EnginePool(httpx.AsyncClient(), urls=(engine.url,), capacity=32)
    config = GatewayConfig(base_name=BASE, poll_interval_s=0.05, base_lora_guard=False)
    gateway = Gateway(config, registry, pool)
    thread = GatewayThread(create_app(gateway))
    try:
        yield registry, gateway, fake, thread
    finally:
        thread.stop()
        engine.stop()
        registry.close()


def _wait_for(predicate: Any, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)


def test_a_new_state_is_served_only_once_all_its_adapters_are_loaded(
    served: tuple[Registry, Any, FakeVLLM, GatewayThread], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    registry, gateway, fake, thread = served
    caplog.set_level(logging.INFO, logger="moea.serving.gateway")
    assert sorted(fake.loaded) == [f"{name}@1" for name in EXPERTS]
    traffic = Traffic(thread.url)
    clients = [threading.Thread(target=traffic.run, args=(name,)) for name in EXPERTS]
    for client in clients:
        client.start()
    try:
        # Registering version 2 of every expert moves no traffic and loads nothing.
        registry.register_run(make_run_dir(tmp_path, EXPERTS, seed=2))
        registered = registry.state_token()
        _wait_for(lambda: gateway.state.token == registered)
        assert gateway.last_change.adapters_loaded == 0 and len(fake.loads) == len(EXPERTS)

        # The scenario: prod moves while the gateway is still loading the previous change.
        fake.gate.clear()  # the first load blocks until the other promotions are in
        registry.promote(f"{EXPERTS[0]}@2")
        _wait_for(lambda: f"{EXPERTS[0]}@2" in fake.requested)  # the gateway is loading that change
        for name in EXPERTS[1:]:
            registry.promote(f"{name}@2")
        final = registry.state_token()
        time.sleep(0.3)
        fake.gate.set()
        _wait_for(lambda: gateway.state.token == final)
        time.sleep(0.3)
    finally:
        traffic.stop.set()
        for client in clients:
            client.join()

    change = gateway.last_change
    assert not traffic.failures and not fake.not_loaded
    before = [expert for _, received, expert in traffic.answers if received < change.swapped_at]
    loading = [
        expert
        for sent, received, expert in traffic.answers
        if change.noticed_at < sent and received < change.swapped_at
    ]
    after = [expert for sent, _, expert in traffic.answers if sent > change.swapped_at]
    assert before and loading and after
    assert {expert.split("@")[1] for expert in before} == {"1"}  # old state only, also while loading
    assert {expert.split("@")[1] for expert in after} == {"2"}  # new state only
    assert {expert.split("@")[0] for expert in loading + after} == set(EXPERTS)
    # No mixture, whatever the gateway's own bookkeeping says: once any answer came from a version 2,
    # no request sent afterwards was answered by a version 1.
    first_new = min(received for _, received, expert in traffic.answers if expert.endswith("@2"))
    assert all(sent < first_new for sent, _, expert in traffic.answers if expert.endswith("@1"))

    assert (change.from_token, change.to_token) == (registered, final)  # intermediate states never served
    assert change.reads == 2 and change.adapters_loaded == len(EXPERTS)
    new_loads = {name: at for name, at in fake.loads[len(EXPERTS) :]}
    assert sorted(new_loads) == sorted(f"{name}@2" for name in EXPERTS)
    assert max(new_loads.values()) <= change.swapped_at  # every new adapter loaded before the swap
    assert change.seconds >= len(EXPERTS) * LOAD_DELAY_S

    metrics = httpx.get(f"{thread.url}/metrics").text
    count = float(re.search(r"^moea_state_apply_seconds_count (\S+)$", metrics, re.M).group(1))  # type: ignore[union-attr]
    total = float(re.search(r"^moea_state_apply_seconds_sum (\S+)$", metrics, re.M).group(1))  # type: ignore[union-attr]
    assert count == 2 and total >= change.seconds
    assert any(
        f"registry state {registered} → {final} serving" in r.getMessage()
        and "6 adapters newly required, loaded before the swap; 2 reads" in r.getMessage()
        for r in caplog.records
    )


class WritesWhileReading:
    """The real registry, with a real write (a promotion) committed right after each `active_experiments`
    read, i.e. in the middle of :func:`serving.state.load_state`, while writes are left."""

    def __init__(self, registry: Registry, promotions: list[str]) -> None:
        self.registry = registry
        self.promotions = promotions

    def __getattr__(self, name: str) -> Any:
        return getattr(self.registry, name)

    def active_experiments(self) -> Any:
        experiments = self.registry.active_experiments()
        if self.promotions:
            self.registry.promote(self.promotions.pop(0))
        return experiments


def test_load_state_reads_one_registry_state_even_when_a_write_lands_midway(
    registry_url: str, tmp_path: Path
) -> None:
    from serving.state import StateUnsettled, load_state

    with Registry(registry_url, tmp_path / "store") as registry:
        for seed in (1, 2):
            registry.register_run(make_run_dir(tmp_path, EXPERTS[:2], seed=seed))
        state = load_state(WritesWhileReading(registry, [f"{EXPERTS[0]}@2"]))
        entry = state.experts[EXPERTS[0]]
        # Read once, this would label the experts read after the promotion with the token from before it.
        assert state.token == registry.state_token()
        assert entry.aliases == {"prod": 2} and entry.serving.version == 2
        assert set(state.required) == {f"{EXPERTS[0]}@2", f"{EXPERTS[1]}@1"}

        endless = WritesWhileReading(registry, [f"{EXPERTS[1]}@{v}" for v in (2, 1, 2)])
        with pytest.raises(StateUnsettled, match="changed during each of 3 reads"):
            load_state(endless, attempts=3)


def test_experts_without_prod_are_served_at_latest_with_a_warning_once(
    registry_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """An expert registered before registering set prod (here: prod removed) keeps serving its latest
    version, as before; the gateway says so once per served version, with the command that pins it."""
    from serving.state import load_state
    from serving.state_swap import warn_unpinned

    with Registry(registry_url, tmp_path / "store") as registry:
        for seed in (1, 2):
            registry.register_run(make_run_dir(tmp_path, EXPERTS[:2], seed=seed))
        registry.remove_alias(EXPERTS[0], "prod")
        state = load_state(registry)
        assert state.experts[EXPERTS[0]].serving.ref == f"{EXPERTS[0]}@2"
        assert state.experts[EXPERTS[1]].serving.ref == f"{EXPERTS[1]}@1"
        with caplog.at_level(logging.WARNING, logger="moea.serving.gateway"):
            warn_unpinned(None, state)
            warn_unpinned(state, load_state(registry))  # same served version: no repeat
        messages = [record.getMessage() for record in caplog.records]
        assert len(messages) == 1 and f"`moea registry promote {EXPERTS[0]}@2`" in messages[0]
