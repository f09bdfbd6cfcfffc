"""Scale-out proven live: two real vLLM CPU engines behind one gateway, one killed with `kill -9` under load.

Real parts only: two vLLM OpenAI servers started the way `moea serve` starts its own (serving/vllm_process.py;
`VLLM_CPU_KVCACHE_SPACE=1`, one core each), one gateway on both (`engine_urls`, as `moea serve --engine-url A
--engine-url B`) on a real SQLite registry with the session's registered run, and concurrent clients using
the real `openai` client (non-streamed, 4 tokens) on `moe`, an expert's alias and a pinned version.

The story, asserted on counts and states (never on durations; the durations are printed):

1. both replicas serve; replica B is killed (SIGKILL to its process group) while requests are in flight on it;
2. every client request still gets a 200: what was in flight on B is sent once more, to A (the gateway's
   `moea_engine_retries_total{reason="broken"}`), and each client request is one exchange (metrics, log);
3. once B is marked down, the gateway sends it nothing (`moea_engine_requests_total` for B stays put);
4. B restarted on its port rejoins only with every serving adapter loaded: B's own /v1/models is read the
   moment the pool first picks B again, then B takes traffic again.

About 2-3 minutes on 2 cores: two engine starts side by side (~1 min), the restart of B (~1 min).
"""

from __future__ import annotations

import os
import random
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from .conftest import ServingAssets, math_prompt, running_gateway, sentiment_prompt

pytestmark = pytest.mark.slow

CLIENTS = 4
MODELS = ("moe", "math", "sentiment@1")  # routed, the expert's serving version, a pinned version
DEADLINE_S = 300.0  # a bound on every wait (an engine start on a busy machine), not a measurement


def engine(base: str, core: int, log: Path, port: int | None = None) -> Any:
    """A vLLM replica as `moea serve` would start it, pinned to `core` with a 1 GiB KV cache."""
    from moe_adapters.base_model import DEFAULT_BASE_NAME
    from serving.vllm_process import EngineSettings, VLLMProcess

    settings = EngineSettings(model=base, served_name=DEFAULT_BASE_NAME, max_loras=2, max_cpu_loras=4,
                              kv_cache_gib=1, cpu_threads_bind=str(core), port=port, log_path=log)  # fmt: skip
    process = VLLMProcess(settings)
    process.start()
    return process


def wait_until(condition: Callable[[], bool], what: str, poll_s: float = 0.01) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not reached within {DEADLINE_S:.0f} s: {what}")
        time.sleep(poll_s)


def wait_healthy(url: str) -> None:
    def healthy() -> bool:
        try:
            return httpx.get(f"{url}/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    wait_until(healthy, f"{url}/health", poll_s=0.5)


@dataclass
class Load:
    """CLIENTS threads, each sending one request after another until stopped; every outcome is kept."""

    url: str
    stop: threading.Event = field(default_factory=threading.Event)
    answers: list[str] = field(default_factory=list)
    """Response ids of the 200 answers."""
    failures: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def run(self, seed: int) -> None:
        client = openai.OpenAI(base_url=f"{self.url}/v1", api_key="unused", max_retries=0, timeout=300)
        rng = random.Random(seed)
        while not self.stop.is_set():
            model = rng.choice(MODELS)
            prompt = sentiment_prompt(rng) if model.startswith("sentiment") else math_prompt(rng)
            try:
                completion = client.chat.completions.create(
                    model=model, messages=[{"role": "user", "content": prompt}], max_tokens=4, temperature=0
                )
            except openai.APIError as error:
                with self.lock:
                    self.failures.append(f"{model}: {error!r}")
            else:
                with self.lock:
                    self.answers.append(completion.id)

    def __enter__(self) -> Load:
        self.threads = [
            threading.Thread(target=self.run, args=(seed,), daemon=True) for seed in range(CLIENTS)
        ]
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=DEADLINE_S)


class Metrics:
    """The gateway's own counters (GET /metrics)."""

    def __init__(self, url: str) -> None:
        self.url = url

    def samples(self, name: str) -> list[tuple[dict[str, str], float]]:
        families = text_string_to_metric_families(httpx.get(f"{self.url}/metrics", timeout=10).text)
        return [(s.labels, s.value) for f in families for s in f.samples if s.name == name]

    def sent(self, replica: str) -> float:
        """Requests sent to `replica` (every try)."""
        return sum(
            v for labels, v in self.samples("moea_engine_requests_total") if labels["replica"] == replica
        )

    def retried(self) -> Counter[tuple[str, str]]:
        samples = self.samples("moea_engine_retries_total")
        return Counter({(labels["replica"], labels["reason"]): value for labels, value in samples})

    def answered(self) -> Counter[str]:
        counts: Counter[str] = Counter()
        for labels, value in self.samples("moea_requests_total"):
            counts[labels["status"]] += value
        return counts


@pytest.fixture
def replicas(serving_assets: ServingAssets, tmp_path: Path) -> Iterator[list[Any]]:
    """Replicas A and B (one core each where there are two); a restarted B is appended to the list."""
    cores = sorted(os.sched_getaffinity(0))
    started = [engine(serving_assets.base, core, tmp_path / f"vllm-{name}.log")
               for name, core in zip("AB", (cores[0], cores[-1]), strict=True)]  # fmt: skip
    try:
        for process in started:
            wait_healthy(process.url)
        yield started
    finally:
        for process in started:
            process.stop()


# long: one story (kill, then rejoin) whose steps build on each other's counts
def test_kill_9_of_a_replica_under_load(
    replicas: list[Any], serving_assets: ServingAssets, tmp_path: Path
) -> None:
    from registry.service import Registry

    registry_url, store = f"sqlite:///{tmp_path / 'registry.db'}", tmp_path / "store"
    registry = Registry(registry_url, store)
    registry.register_run(serving_assets.run1)
    a, b = replicas
    urls = (a.url, b.url)
    rejoin: dict[str, Any] = {}
    times: dict[str, float] = {}
    with running_gateway(registry_url, store, serving_assets.base, engine_urls=urls) as gateway:
        pool = gateway.app.state.gateway.pool
        replica_b = pool.replicas[1]
        metrics = Metrics(gateway.url)
        required = set(pool.required)
        assert {"math@1", "sentiment@1"} <= required

        with Load(gateway.url) as load:
            # 1. both serve; kill B while requests are in flight on it
            wait_until(lambda: metrics.sent(replica_b.name) >= 3 and replica_b.inflight >= 1, "B busy")
            in_flight_on_b = replica_b.inflight
            times["kill"] = time.monotonic()
            os.killpg(b.pid, signal.SIGKILL)
            wait_until(lambda: not replica_b.healthy, "B marked down", poll_s=0.001)
            times["down"] = time.monotonic()
            sent_to_b_when_down = metrics.sent(replica_b.name)
            answered_when_down = len(load.answers)
            b.stop()  # reaps the killed process group (already dead: nothing left to stop)

            # 3. A alone takes the load; B gets nothing
            wait_until(lambda: len(load.answers) >= answered_when_down + 4 * CLIENTS, "A serving alone")
            assert metrics.sent(replica_b.name) == sent_to_b_when_down

            # 4. B back on its port: the first pick of B reads B's own adapter list
            def pick(adapter: str | None, _pick: Callable[..., Any] = pool.pick) -> Any:
                chosen = _pick(adapter)
                if chosen is replica_b and not rejoin:
                    times["rejoin"] = time.monotonic()
                    rejoin["sent_to_b"] = pool.metrics.registry.get_sample_value(  # in the gateway's thread
                        "moea_engine_requests_total", {"replica": replica_b.name}
                    )
                    cards = httpx.get(f"{replica_b.url}/v1/models", timeout=10).json()["data"]
                    rejoin["listed"] = {card["id"] for card in cards if card.get("parent")}
                return chosen

            pool.pick = pick  # type: ignore[method-assign]  # a spy: the real pick decides
            cores = sorted(os.sched_getaffinity(0))
            times["restart"] = time.monotonic()
            replicas.append(engine(serving_assets.base, cores[-1], tmp_path / "vllm-B2.log", port=b.port))
            wait_until(lambda: bool(rejoin), "B picked again", poll_s=0.05)
            assert rejoin["sent_to_b"] == sent_to_b_when_down  # nothing sent to B while it was out
            wait_until(lambda: metrics.sent(replica_b.name) >= sent_to_b_when_down + 3, "B serving again")

        answered, failures = list(load.answers), list(load.failures)
        retried = metrics.retried()
        by_status = metrics.answered()
    # (the gateway stopped: its request log is drained into the registry)

    assert failures == []  # 2. every client request answered
    assert retried[(replica_b.name, "broken")] >= 1  # in flight on B at the kill, sent again to A
    assert sum(v for (name, _), v in retried.items() if name != replica_b.name) == 0
    assert by_status == Counter({"200": len(answered)})  # one exchange per client request
    logged = _logged_ids(registry)
    assert sorted(logged) == sorted(answered)  # one request-log row per answer, none twice
    assert required <= rejoin["listed"]  # 4. every serving adapter in B before its first pick
    print(
        f"\n{len(answered)} requests, {len(failures)} failed; in flight on B at the kill: {in_flight_on_b}, "
        f"sent again: {retried[(replica_b.name, 'broken')]:.0f}; kill -> out of rotation "
        f"{times['down'] - times['kill']:.3f} s; restart -> first pick of B {times['rejoin'] - times['restart']:.1f} s"
        f" (B listed {sorted(rejoin['listed'])}); load {os.getloadavg()}"
    )
    registry.close()


def _logged_ids(registry: Any) -> list[str]:
    import sqlalchemy as sa

    with registry.engine.connect() as connection:
        return [
            row.request_id
            for row in connection.execute(sa.text("SELECT request_id FROM requests WHERE shadow = 0"))
        ]
