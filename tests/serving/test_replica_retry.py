"""Which requests the gateway sends again to another replica, and how a replica rejoins.

The gateway is the real one (uvicorn, real SQLite registry, the real `openai` client) in front of two FAKE
vLLM servers (fake_vllm.py: tiny FastAPI apps, not vLLM) whose faults are set per test: a fake hangs up on
a chat request (closes the connection mid-answer, as a vLLM killed then does) or loads adapters slowly.
Which replica a request goes to first is asked from the pool's own `pick` (rendezvous hash of the ports).
The live version, two real vLLM engines and a real `kill -9`, is tests/serving/test_replicas_live.py.

Supervision is slowed down (health checks hourly) in the retry tests, so a replica the gateway marked down
stays down for the test and every count below is exact.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from registry.service import Registry

from .conftest import GatewayThread
from .fake_vllm import FakeFaults, fake_vllm
from .registry_fixtures import make_run_dir

BASE = "fake-base"
ADAPTER = "summarize@1"
ANSWER = "hello from summarize@1"


@dataclass
class Stack:
    url: str
    gateway: Any
    engines: dict[str, GatewayThread]
    """Replica name (host:port, as the metrics label it) → its fake engine."""
    faults: dict[str, FakeFaults]

    @property
    def first(self) -> str:
        """The replica a request for ADAPTER goes to first."""
        return str(self.gateway.pool.pick(ADAPTER).name)

    @property
    def second(self) -> str:
        return next(name for name in self.engines if name != self.first)

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key="unused", max_retries=0, timeout=30)

    def samples(self, name: str) -> dict[tuple[tuple[str, str], ...], float]:
        """The gateway's own samples of metric `name` (labels → value) from GET /metrics."""
        families = text_string_to_metric_families(httpx.get(f"{self.url}/metrics", timeout=10).text)
        return {
            tuple(sorted(sample.labels.items())): sample.value
            for family in families
            for sample in family.samples
            if sample.name == name
        }

    def sent(self) -> dict[str, float]:
        """Requests sent to each replica (every try)."""
        counts = {name: 0.0 for name in self.engines}
        for labels, value in self.samples("moea_engine_requests_total").items():
            counts[dict(labels)["replica"]] = value
        return counts

    def retries(self) -> dict[tuple[str, str], float]:
        """(replica that failed, reason) → requests sent again elsewhere."""
        return {
            (dict(labels)["replica"], dict(labels)["reason"]): value
            for labels, value in self.samples("moea_engine_retries_total").items()
        }

    def answered(self) -> dict[str, float]:
        """Client requests by the status the gateway answered (one per request, retried or not)."""
        counts: dict[str, float] = {}
        for labels, value in self.samples("moea_requests_total").items():
            status = dict(labels)["status"]
            counts[status] = counts.get(status, 0.0) + value
        return counts


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    """Two fake engines behind one real gateway (hourly health checks: marked down stays down)."""
    from serving.app import create_app
    from serving.engine import EnginePool
    from serving.gateway import Gateway
    from serving.metrics import GatewayMetrics
    from serving.settings import GatewayConfig

    registry = Registry(f"sqlite:///{tmp_path / 'registry.db'}", tmp_path / "store")
    registry.register_run(make_run_dir(tmp_path, ["summarize"], 1))
    faults = [FakeFaults(), FakeFaults()]
    engines = [GatewayThread(fake_vllm(BASE, faults=fault)) for fault in faults]
    metrics = GatewayMetrics()
    urls = tuple(engine.url for engine in engines)
    pool = EnginePool(httpx.AsyncClient(), urls=urls, capacity=4, metrics=metrics, health_interval_s=3600)
    config = GatewayConfig(base_name=BASE, poll_interval_s=0.2, base_lora_guard=False)
    gateway = Gateway(config, registry, pool, metrics=metrics)
    thread = GatewayThread(create_app(gateway))
    names = [replica.name for replica in pool.replicas]
    try:
        yield Stack(thread.url, gateway, dict(zip(names, engines, strict=True)),
                    dict(zip(names, faults, strict=True)))  # fmt: skip
    finally:
        thread.stop()
        for engine in engines:
            engine.stop()
        registry.close()


def chat(client: openai.OpenAI, **kwargs: Any) -> Any:
    return client.chat.completions.create(
        model="summarize", messages=[{"role": "user", "content": "hi"}], **kwargs
    )


def streamed_text(client: openai.OpenAI) -> str:
    return "".join(
        chunk.choices[0].delta.content or "" for chunk in chat(client, stream=True) if chunk.choices
    )


def test_a_non_streamed_request_cut_off_by_its_replica_is_answered_by_the_other(stack: Stack) -> None:
    first, second = stack.first, stack.second
    stack.faults[first].hang_up.add(ADAPTER)
    assert chat(stack.client()).choices[0].message.content == ANSWER
    assert stack.sent() == {first: 1, second: 1}
    assert stack.retries() == {(first, "broken"): 1}
    assert stack.answered() == {"200": 1}  # one exchange for the client's one request
    assert [r.name for r in stack.gateway.pool.healthy_replicas] == [second]  # out of rotation


def test_a_stream_cut_before_its_first_event_is_answered_by_the_other(stack: Stack) -> None:
    first, second = stack.first, stack.second
    stack.faults[first].hang_up.add(ADAPTER)
    assert streamed_text(stack.client()) == ANSWER
    assert stack.sent() == {first: 1, second: 1}
    assert stack.retries() == {(first, "broken"): 1}
    assert stack.answered() == {"200": 1}


def test_a_stream_cut_after_events_were_relayed_is_not_sent_again(stack: Stack) -> None:
    first, second = stack.first, stack.second
    stack.faults[first].hang_up_mid_stream.add(ADAPTER)
    text = streamed_text(stack.client())
    assert text and ANSWER.startswith(text) and text != ANSWER  # the client has part of an answer: it ends
    assert stack.sent() == {first: 1, second: 0}
    assert stack.retries() == {}
    assert stack.answered() == {"503": 1}
    assert [r.name for r in stack.gateway.pool.healthy_replicas] == [second]


def test_a_second_failure_is_a_503(stack: Stack) -> None:
    for faults in stack.faults.values():
        faults.hang_up.add(ADAPTER)
    first, second = stack.first, stack.second
    with pytest.raises(openai.InternalServerError) as caught:
        chat(stack.client())
    assert caught.value.status_code == 503
    assert "engine failed during the request (RemoteProtocolError)" in caught.value.message
    assert stack.sent() == {first: 1, second: 1}  # sent twice at most
    assert stack.retries() == {(first, "broken"): 1}
    assert stack.answered() == {"503": 1}


def test_a_stopped_replica_gets_one_request_then_none(stack: Stack) -> None:
    first, second = stack.first, stack.second
    stack.engines[first].stop()  # refuses connections from now on
    client = stack.client()
    for _ in range(10):
        assert chat(client).choices[0].message.content == ANSWER
    assert stack.sent() == {first: 1, second: 10}  # the first request tried there, then never again
    assert stack.retries() == {(first, "broken"): 1}
    assert stack.answered() == {"200": 10}


def test_an_adapter_load_on_a_replica_found_dead_goes_to_another() -> None:
    """A pinned (on-demand) adapter is loaded into the picked replica first; when that replica turns out
    unreachable, the pool marks it down and picks another before anything is sent."""
    from serving.engine import EnginePool

    async def scenario(live: str) -> None:
        dead = "http://127.0.0.1:9"  # nothing listens there
        pool = EnginePool(httpx.AsyncClient(), urls=(dead, live), capacity=4)
        for replica in pool.replicas:
            replica.healthy = True
        pool.replicas[1].inflight = 100  # the dead one is picked first (the less busy of the two)
        lease = await pool.acquire("pinned@3", "/pinned")
        assert lease.replica is pool.replicas[1] and "pinned@3" in pool.replicas[1].loaded
        assert not pool.replicas[0].healthy
        pool.release(lease)
        await pool.client.aclose()

    engine = GatewayThread(fake_vllm(BASE))
    try:
        asyncio.run(scenario(engine.url))
    finally:
        engine.stop()


def test_a_replica_back_from_the_dead_has_every_required_adapter_before_it_is_healthy() -> None:
    """Also the adapters that became required while it was loading the others (an engine that restarted
    has none: the pool loads them one by one, here slowly, before it puts the replica back in rotation)."""
    from serving.engine import EnginePool

    async def wait(condition: Any) -> None:
        for _ in range(2000):  # 10 s at most
            if condition():
                return
            await asyncio.sleep(0.005)
        raise AssertionError("condition not reached")

    async def scenario(a: GatewayThread, b: GatewayThread) -> None:
        pool = EnginePool(httpx.AsyncClient(), urls=(a.url, b.url), capacity=4, health_interval_s=0.05)
        pool.required = {"x@1": "/x"}
        await pool.start()
        replica = pool.replicas[1]
        await asyncio.to_thread(b.stop)
        await wait(lambda: not replica.healthy)
        faults = FakeFaults(load_delay_s=0.5)
        app = fake_vllm(BASE, faults=faults)  # the engine back on its port, with no adapter
        restarted = await asyncio.to_thread(GatewayThread, app, 30.0, b.port)
        seen_when_healthy: list[set[str]] = []
        try:
            await wait(lambda: "x@1" in faults.loads)  # the pool is bringing it back: x@1 is loading
            await pool.set_required({"x@1": "/x", "y@1": "/y"})
            await wait(lambda: replica.healthy)
            seen_when_healthy.append(set(app.state.loaded))
        finally:
            await pool.close()
            await pool.client.aclose()
            await asyncio.to_thread(restarted.stop)
        assert seen_when_healthy == [{"x@1", "y@1"}]
        assert set(apps[0].state.loaded) == {"x@1", "y@1"}

    apps = [fake_vllm(BASE), fake_vllm(BASE)]
    a, b = GatewayThread(apps[0]), GatewayThread(apps[1])
    try:
        asyncio.run(scenario(a, b))
    finally:
        a.stop()
        b.stop()
