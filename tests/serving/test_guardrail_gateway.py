"""The real gateway (uvicorn, request-log writer, guardrail monitor, real SQLite registry, openai client)
in front of a FAKE vLLM server: a tiny FastAPI app that answers like vLLM but fails every request for
the treatment arm's LoRA name. What is under test is the gateway's own behaviour: it logs the failures,
its monitor stops the experiment, traffic goes back to the control, the alert metric is raised."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from registry.service import Registry

from .conftest import GatewayThread, wait_for_experiment
from .fake_vllm import fake_vllm
from .registry_fixtures import make_run_dir

BASE = "fake-base"
FAILING = "summarize@2"


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[tuple[str, Registry]]:
    """Fake engine + real gateway (guardrail checks every 0.3 s) on a real SQLite registry."""
    from serving.app import create_app
    from serving.engine import EnginePool
    from serving.gateway import Gateway
    from serving.metrics import GatewayMetrics
    from serving.request_log import RequestLogWriter
    from serving.settings import GatewayConfig

    registry = Registry(f"sqlite:///{tmp_path / 'registry.db'}", tmp_path / "store")
    for seed in (1, 2):
        registry.register_run(make_run_dir(tmp_path, ["summarize"], seed))
    registry.promote("summarize@1")
    engine = GatewayThread(fake_vllm(BASE, frozenset({FAILING})))
    metrics = GatewayMetrics()
    gateway = Gateway(
        GatewayConfig(base_name=BASE, poll_interval_s=0.2, base_lora_guard=False),
        registry,
        EnginePool(httpx.AsyncClient(), urls=(engine.url,), capacity=4, metrics=metrics),
        request_log=RequestLogWriter(registry, flush_interval_s=0.2, metrics_registry=metrics.registry),
        metrics=metrics,
    )
    thread = GatewayThread(create_app(gateway, guard_interval_s=0.3))
    try:
        yield thread.url, registry
    finally:
        thread.stop()
        engine.stop()
        registry.close()


def ask(client: openai.OpenAI, user: str) -> str | None:
    """The adapter that answered `user` (None when the gateway relayed the engine's 500)."""
    try:
        response = client.chat.completions.with_raw_response.create(
            model="summarize", messages=[{"role": "user", "content": "hi"}], user=user
        )
    except openai.InternalServerError:
        return None
    return response.headers["x-moea-expert"]


def test_gateway_stops_a_failing_arm_and_sends_everyone_to_control(stack: tuple[str, Registry]) -> None:
    url, registry = stack
    experiment = registry.start_experiment(
        "summarize", [(1, 50), (2, 50)], guardrails=["error_rate<=0.05"], guard_settings={"min_units": 20}
    )
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    answers: dict[str, str | None] = {}
    wait_for_experiment(url, "summarize", experiment.id)  # the gateway, not the registry, must know it
    for index in range(200):
        answers[f"user-{index}"] = ask(client, f"user-{index}")
        if registry.get_experiment(experiment.id).status == "stopped":
            break
    assert None in answers.values() and "summarize@1" in answers.values()  # both arms served

    deadline = time.monotonic() + 20
    while registry.get_experiment(experiment.id).status == "running" and time.monotonic() < deadline:
        time.sleep(0.1)
    stopped = registry.get_experiment(experiment.id)
    assert stopped.status == "stopped", "the monitor did not stop the failing arm"
    assert stopped.stop_reason.startswith("guardrail error_rate<=0.05 breached by summarize@2")
    assert registry.resolve("summarize@prod").version == 1
    assert registry.history("summarize", "prod")[-1].reason == stopped.stop_reason

    exposition = text_string_to_metric_families(httpx.get(f"{url}/metrics").text)
    breached = [s for family in exposition for s in family.samples if s.name == "moea_guardrail_breached"]
    labels = {"expert": "summarize", "experiment": str(experiment.id), "guardrail": "error_rate<=0.05"}
    assert [(s.labels, s.value) for s in breached] == [(labels, 1.0)]

    failed_before = [user for user, adapter in answers.items() if adapter is None]
    # Wait for the gateway's state refresh on a user the failing arm had (a control user proves nothing).
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and ask(client, failed_before[0]) != "summarize@1":
        time.sleep(0.1)
    assert {ask(client, user) for user in failed_before} == {"summarize@1"}  # every user back on the control
