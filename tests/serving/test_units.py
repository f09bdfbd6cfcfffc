"""Fast tests of the serving pieces that need no engine: request schemas, replica choice and adapter
leases, engine command line, router micro-batching and label checks."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import ValidationError

from serving.engine import EnginePool, EngineUnavailable
from serving.errors import APIError, validation_error
from serving.router_runtime import RouterRuntime, RouterRuntimeError, check_labels
from serving.schemas import ChatCompletionRequest, CompletionRequest, FeedbackRequest
from serving.vllm_process import EngineSettings

from .conftest import task_prompts

CHAT = {"model": "math", "messages": [{"role": "user", "content": "hi"}]}


@pytest.mark.parametrize(
    ("extra", "param", "code"),
    [
        ({"foo": 1}, "foo", "unknown_parameter"),
        ({"max_tokens": 0}, "max_tokens", "invalid_value"),
        ({"max_tokens": True}, "max_tokens", "invalid_value"),
        ({"temperature": 2.5}, "temperature", "invalid_value"),
        ({"temperature": float("nan")}, "temperature", "invalid_value"),
        ({"top_p": 1.5}, "top_p", "invalid_value"),
        ({"messages": [{"role": "user", "content": {"a": 1}}]}, "messages.0.content", "invalid_value"),
        ({"stream_options": {"include_usage": True, "x": 1}}, "stream_options.x", "unknown_parameter"),
        ({"model": ""}, "model", "invalid_value"),
    ],
)
def test_chat_request_rejections_name_the_field(extra: dict[str, Any], param: str, code: str) -> None:
    with pytest.raises(ValidationError) as caught:
        ChatCompletionRequest.model_validate({**CHAT, **extra})
    error = validation_error(caught.value)
    assert (error.status, error.param, error.code) == (400, param, code)
    assert param.split(".")[0] in error.message


def test_chat_request_accepts_openai_and_vllm_fields() -> None:
    parsed = ChatCompletionRequest.model_validate(
        {
            **CHAT,
            "max_tokens": 5,
            "temperature": 0,
            "top_p": 1,
            "stream": True,
            "user": "u",
            "top_k": 3,
            "stream_options": {"include_usage": False},
            "seed": 1,
            "stop": ["\n"],
            "messages": [
                {"role": "system", "content": "s"},
                {"role": "user", "content": [{"type": "text", "text": "q?"}]},
                {"role": "assistant", "content": "a", "name": "bot"},
            ],
        }  # fmt: skip
    )
    assert parsed.streaming and not parsed.wants_usage_in_stream
    assert parsed.routing_text() == "q?"  # the last *user* message


def test_completion_request_routing_text() -> None:
    assert CompletionRequest.model_validate({"model": "m", "prompt": ["a", "b"]}).routing_text() == "a"
    assert CompletionRequest.model_validate({"model": "m", "prompt": [1, 2]}).routing_text() == ""
    with pytest.raises(ValidationError):
        CompletionRequest.model_validate({"model": "m", "prompt": []})


@pytest.mark.parametrize(
    ("body", "ok"),
    [
        ({"id": "x", "reward": 0.5}, True),
        ({"id": "x", "thumbs": "down"}, True),
        ({"id": "x"}, False),
        ({"id": "x", "reward": 1, "thumbs": "up"}, False),
        ({"id": "", "reward": 1}, False),
        ({"id": "x", "reward": float("inf")}, False),
    ],  # fmt: skip
)
def test_feedback_request(body: dict[str, Any], ok: bool) -> None:
    if ok:
        FeedbackRequest.model_validate(body)
    else:
        with pytest.raises(ValidationError):
            FeedbackRequest.model_validate(body)


def test_api_error_shape() -> None:
    response = APIError(404, "nope", param="model", code="model_not_found").response()
    assert response.status_code == 404
    assert (
        response.body
        == b'{"error":{"message":"nope","type":"invalid_request_error","param":"model","code":"model_not_found"}}'
    )


def test_engine_command_and_environment() -> None:
    settings = EngineSettings(model="/m", served_name="B", max_loras=3, max_cpu_loras=6, cpu_threads_bind="0-1",
                              extra_args=("--tensor-parallel-size", "2"))  # fmt: skip
    cmd = settings.command(1234)
    assert cmd[1:3] == ["-m", "vllm.entrypoints.openai.api_server"]
    for flag, value in [("--model", "/m"), ("--served-model-name", "B"), ("--port", "1234"), ("--max-loras", "3"),
                        ("--max-cpu-loras", "6"), ("--max-lora-rank", "8"), ("--tensor-parallel-size", "2")]:  # fmt: skip
        assert cmd[cmd.index(flag) + 1] == value
    assert "--enable-lora" in cmd and "--enforce-eager" in cmd
    env = settings.environment()
    assert env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True" and env["VLLM_CPU_OMP_THREADS_BIND"] == "0-1"
    assert settings.adapter_capacity == 6
    base_only = EngineSettings(model="/m", served_name="B", enable_lora=False, max_cpu_loras=6).command(1234)
    assert not {"--enable-lora", "--max-loras", "--max-lora-rank", "--max-cpu-loras"} & set(base_only)


def _pool(n: int) -> EnginePool:
    pool = EnginePool(
        httpx.AsyncClient(), urls=tuple(f"http://127.0.0.1:{9000 + i}" for i in range(n)), capacity=2
    )
    for replica in pool.replicas:
        replica.healthy = True
        replica.loaded = {"a@1": "/a", "b@1": "/b"}
    return pool


def test_a_replica_down_for_one_reason_is_logged_once_then_every_thirtieth_try(caplog) -> None:
    """Nothing listens on the replica's port (every recovery fails at once): the supervisor retries each
    health interval, and the log says so on the first try and every RECOVERY_LOG_EVERY-th, not each time."""
    import socket

    from serving.engine import RECOVERY_LOG_EVERY

    with socket.socket() as probe:  # a port that was free a moment ago: connections are refused
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    pool = EnginePool(httpx.AsyncClient(), urls=(f"http://127.0.0.1:{port}",), capacity=2)
    replica = pool.replicas[0]

    async def recover(times: int) -> None:
        for _ in range(times):
            await pool._recover(replica)

    with caplog.at_level("ERROR", logger="moea.serving.engine"):
        asyncio.run(recover(2 * RECOVERY_LOG_EVERY + 1))
    lines = [r.getMessage() for r in caplog.records if "not recovered yet" in r.getMessage()]
    assert replica.failures == 2 * RECOVERY_LOG_EVERY + 1 and not replica.healthy
    assert [line.split(" after ")[1].split(" tries")[0] for line in lines] == [
        "1",
        str(RECOVERY_LOG_EVERY),
        str(2 * RECOVERY_LOG_EVERY),
    ]


def test_pick_has_adapter_affinity_and_skips_unhealthy() -> None:
    pool = _pool(4)
    first = {adapter: pool.pick(adapter) for adapter in ("a@1", "b@1", "c@1", None)}
    assert all(pool.pick(adapter) is replica for adapter, replica in first.items())  # stable while idle
    busy = first["a@1"]
    busy.inflight = 100  # the second-best replica takes over while the first is busy
    assert pool.pick("a@1") is not busy
    for replica in pool.replicas:
        replica.healthy = False
    with pytest.raises(EngineUnavailable):
        pool.pick("a@1")


def test_unload_waits_for_leases() -> None:
    async def scenario() -> None:
        pool = _pool(1)
        replica = pool.replicas[0]
        lease = await pool.acquire("a@1", "/a")  # loaded: no engine call
        assert replica.in_use["a@1"] == 1 and replica.inflight == 1
        assert await pool.unload(replica, "a@1") is False  # held by a request: stays
        assert "a@1" in replica.loaded
        pool.release(lease)
        pool.release(lease)  # idempotent
        assert replica.inflight == 0 and not replica.in_use
        pool.required = {"b@1": "/b"}
        assert await pool.unload(replica, "b@1") is False  # required adapters are never unloaded
        await pool.client.aclose()

    asyncio.run(scenario())


def test_check_labels() -> None:
    check_labels(["math"], ["math", "sentiment"], "router@1")
    with pytest.raises(RouterRuntimeError, match="router@2 routes to poem, which is not registered"):
        check_labels(["math", "poem"], ["math"], "router@2")


class _RouterRegistry:
    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def latest_router(self) -> Any:
        return None

    def router_artifact_path(self, view: Any) -> Path:
        return self.folder


class _View:
    def __init__(self, version: int, labels: list[str]) -> None:
        self.version, self.labels, self.ref = version, labels, f"router@{version}"


@pytest.mark.slow  # trains a small router (~30 s on 2 cores)
def test_router_runtime_batches_concurrent_requests_and_refuses_unknown_labels(tmp_path: Path) -> None:
    from moe_adapters.config import RouterSettings
    from moe_adapters.router import Router
    from moe_adapters.router_training import train_router

    train_router(
        task_prompts(40, 0),
        task_prompts(10, 1),
        tmp_path,
        RouterSettings(encoder="minilm", heads=("linear",)),
    )
    registry = _RouterRegistry(tmp_path)
    prompts = task_prompts(20, 5)["math"] + task_prompts(20, 6)["sentiment"]
    expected = [decision.label for decision in Router.load(tmp_path, "cpu").route(prompts)]

    async def scenario() -> None:
        runtime = RouterRuntime(device="cpu", max_batch=32)
        with pytest.raises(RouterRuntimeError):
            await runtime.swap(registry, _View(1, ["math", "sentiment"]), ["math"], strict=True)
        await runtime.swap(registry, _View(1, ["math", "sentiment"]), ["math"], strict=False)
        assert runtime.current is None  # refused on swap too: nothing (or the old router) keeps serving
        await runtime.swap(registry, _View(1, ["math", "sentiment"]), ["math", "sentiment"], strict=True)
        decisions = await asyncio.gather(*(runtime.route(prompt) for prompt in prompts))
        assert [d.label for d in decisions] == expected
        batches = runtime.metrics.router_batch.collect()[0].samples
        count = next(s.value for s in batches if s.name.endswith("_count"))
        assert count < len(prompts)  # concurrent requests shared forward passes
        await runtime.close()

    asyncio.run(scenario())
