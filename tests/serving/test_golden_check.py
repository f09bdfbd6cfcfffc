"""A version answers its golden prompts before it takes traffic (serving/golden_check.py).

The gateway is real (uvicorn, real SQLite registry and artifact store, the real `openai` client); the
engine behind it is a *fake* vLLM (:class:`FakeVLLM`, a tiny FastAPI app, not vLLM) that answers each
prompt with ``answer to <prompt>``, except for the adapters told to answer differently: what is tested
is the gateway's own load path, which compares the engine's answers with the recorded ones.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from registry.service import Registry
from serving.golden_check import allowed_differences, differing

from .conftest import GatewayThread
from .registry_fixtures import make_run_dir

BASE = "SmolLM2-135M-Instruct"
EXPERTS = ["math", "sentiment"]
PROMPTS = ["2+2?", "3+3?", "4+4?"]


class FakeVLLM:
    """A fake vLLM OpenAI server (not vLLM): loads/unloads adapters and answers chat requests with
    ``answer to <last user message>``; ``wrong[adapter]`` = how many of :data:`PROMPTS` it answers wrongly."""

    def __init__(self) -> None:
        self.loaded: dict[str, str] = {}
        self.wrong: dict[str, int] = {}
        self.asked: list[tuple[str, str]] = []
        self.down = False
        """Health checks and the model list answer 503 (an engine that is restarting)."""
        self.app = FastAPI()

        @self.app.get("/health", response_model=None)
        async def health() -> dict[str, str] | JSONResponse:
            return JSONResponse({}, 503) if self.down else {}

        @self.app.get("/v1/models", response_model=None)
        async def models() -> dict[str, Any] | JSONResponse:
            if self.down:
                return JSONResponse({"error": {"message": "restarting"}}, 503)
            cards = [{"id": BASE, "root": BASE, "parent": None}]
            return {
                "object": "list",
                "data": cards + [{"id": n, "root": p, "parent": BASE} for n, p in self.loaded.items()],
            }

        @self.app.post("/v1/load_lora_adapter")
        async def load(request: Request) -> JSONResponse:
            body = await request.json()
            self.loaded[body["lora_name"]] = body["lora_path"]
            return JSONResponse("Success")

        @self.app.post("/v1/unload_lora_adapter")
        async def unload(request: Request) -> JSONResponse:
            self.loaded.pop((await request.json())["lora_name"], None)
            return JSONResponse("Success")

        @self.app.post("/v1/chat/completions")
        async def chat(request: Request) -> JSONResponse:
            body = await request.json()
            model, prompt = body["model"], body["messages"][-1]["content"]
            if model != BASE and model not in self.loaded:
                return JSONResponse({"error": {"message": f"The model `{model}` does not exist."}}, 404)
            self.asked.append((model, prompt))
            wrong = prompt in PROMPTS[: self.wrong.get(model, 0)]
            content = f"something else ({model})" if wrong else f"answer to {prompt}"
            return JSONResponse(
                {"id": "chatcmpl-fake", "object": "chat.completion", "created": 0, "model": model,
                 "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                              "finish_reason": "stop"}],
                 "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}
            )  # fmt: skip


def _record_golden(registry: Registry, ref: str, golden_file: Path) -> None:
    """Attach a golden set and record `ref`'s greedy answers on it (what a gated promote records)."""
    name, version = ref.split("@")
    golden_file.write_text("".join(f'{{"prompt": "{p}", "response": "x"}}\n' for p in PROMPTS))
    golden, _ = registry.attach_golden(name, golden_file)
    probes = [
        {"messages": [{"role": "user", "content": p}], "answer": f"answer to {p}", "max_tokens": 8}
        for p in PROMPTS
    ]
    registry.record_eval_score(
        name, int(version), golden.sha256, {"metric": "rougeL", "score": 0.5, "n": 3, "probes": probes}
    )


@pytest.fixture
def served(registry_url: str, tmp_path: Path) -> Iterator[tuple[Registry, Any, FakeVLLM, GatewayThread]]:
    from serving.app import create_app
    from serving.engine import EnginePool
    from serving.gateway import Gateway
    from serving.settings import GatewayConfig

    registry = Registry(registry_url, tmp_path / "store")
    registry.register_run(make_run_dir(tmp_path, EXPERTS, seed=1))  # prod → v1
    registry.register_run(make_run_dir(tmp_path, EXPERTS, seed=2))  # v2, not served
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
        time.sleep(0.02)


def _served_version(url: str, model: str) -> str:
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=30)
    raw = client.chat.completions.with_raw_response.create(
        model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=1
    )
    return raw.headers["x-moea-expert"]


def test_a_version_that_answers_its_golden_prompts_wrongly_is_not_swapped_in(
    served: tuple[Registry, Any, FakeVLLM, GatewayThread], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    registry, gateway, fake, thread = served
    _record_golden(registry, "sentiment@2", tmp_path / "sentiment.jsonl")
    _record_golden(registry, "math@2", tmp_path / "math.jsonl")
    fake.wrong = {"sentiment@2": 1, "math@2": 3}

    # 1 of 3 answers differs (a bf16 near-tie flip): within tolerance, the version is swapped in.
    registry.promote("sentiment@2")
    _wait_for(lambda: gateway.state.token == registry.state_token())
    assert _served_version(thread.url, "sentiment") == "sentiment@2"
    assert [p for m, p in fake.asked if m == "sentiment@2"] == [*PROMPTS, "hi"]  # golden prompts first

    # 3 of 3 differ: the new state is held back, the old one keeps serving; the verdict is kept.
    held = registry.state_token()
    registry.promote("math@2")
    _wait_for(lambda: "math@2" in gateway.golden.failed)
    time.sleep(0.3)  # several polls
    assert gateway.state.token == held and _served_version(thread.url, "math") == "math@1"
    assert [p for m, p in fake.asked if m == "math@2"] == PROMPTS  # probed once, not on every poll
    metrics = httpx.get(f"{thread.url}/metrics").text
    assert 'moea_golden_check_failed{adapter="math@2"} 1.0' in metrics
    assert 'moea_golden_checks_total{outcome="failed"} 1.0' in metrics
    assert 'moea_golden_checks_total{outcome="passed"} 1.0' in metrics
    assert "math@2 failed its golden-prompt check" in caplog.text and "3 of 3 answers differ" in caplog.text
    assert caplog.text.count("registry state held back") == 1  # logged once, not per poll

    # Moving the registry off the failing version lets changes flow again.
    registry.rollback("math")
    _wait_for(lambda: gateway.state.token == registry.state_token())
    assert _served_version(thread.url, "math") == "math@1"
    assert 'moea_golden_check_failed{adapter="math@2"} 0.0' in httpx.get(f"{thread.url}/metrics").text


def test_a_replica_that_comes_back_answers_the_golden_prompts_before_it_takes_traffic(
    served: tuple[Registry, Any, FakeVLLM, GatewayThread], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    registry, gateway, fake, thread = served
    replica = gateway.pool.replicas[0]
    _record_golden(registry, "math@2", tmp_path / "math.jsonl")
    registry.promote("math@2")
    _wait_for(lambda: gateway.state.token == registry.state_token())
    assert _served_version(thread.url, "math") == "math@2"

    # The engine restarts (its adapters are gone) and, once math@2 is loaded again, answers it wrongly
    # (a bad dynamic load): the replica is reloaded and probed, and stays out of rotation.
    fake.down = True
    _wait_for(lambda: not replica.healthy)
    asked = len(fake.asked)
    fake.loaded.clear()
    fake.wrong = {"math@2": 3}
    fake.down = False
    _wait_for(lambda: [p for m, p in fake.asked[asked:] if m == "math@2"] == PROMPTS)
    time.sleep(0.3)
    assert not replica.healthy and "math@2" in fake.loaded
    client = openai.OpenAI(base_url=f"{thread.url}/v1", api_key="none", max_retries=0, timeout=30)
    with pytest.raises(openai.APIStatusError) as refused:
        client.chat.completions.create(
            model="math", messages=[{"role": "user", "content": "hi"}], max_tokens=1
        )
    assert refused.value.status_code == 503
    assert "math@2 failed its golden-prompt check" in caplog.text
    assert "math@2" not in gateway.golden.failed  # the version is fine: this replica's load is not

    # The next recovery finds it answering right again: back in rotation, the version still served.
    fake.wrong = {}
    _wait_for(lambda: replica.healthy)
    assert _served_version(thread.url, "math") == "math@2"


def test_tolerance_allows_one_differing_answer_while_one_matches() -> None:
    assert [allowed_differences(n) for n in (1, 2, 3, 10)] == [0, 1, 1, 1]
    assert differing(["a", "b ", "c"], ["a", " b", "x"]) == [2]
