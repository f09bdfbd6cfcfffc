"""API key names and scopes, who may rate which response, /health without a key, and 500s that keep
their exception text to the log: the real gateway (uvicorn, real HTTP, the real `openai` client, a real
SQLite registry and request-log writer) in front of a FAKE vLLM — a tiny FastAPI app that answers
/health, /v1/models and completions with canned JSON — since the behaviour under test is the gateway's
own. Also: the engine key reaches a started vLLM through its environment, not its argv."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sqlite3
import stat
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import PlainTextResponse

from registry.service import Registry
from serving.auth import CLIENT_SCOPES, ApiKeySpecError, KeyRing, bare_key_name, parse_key_spec, split_env

from .conftest import GatewayThread

BASE = "SmolLM2-135M-Instruct"
ALICE, BOB, OPS = "alice-secret-7f3a91", "bob-secret-2c8e44", "ops-secret-9d1b07"
READER, WRITER, LEGACY = "reader-secret-51aa", "writer-secret-0be3", "legacy-secret-c4d2"
KEYS = (
    f"alice:{ALICE}:chat,feedback",
    f"bob:{BOB}:chat,feedback",
    f"ops:{OPS}:admin",
    f"reader:{READER}:read",
    f"writer:{WRITER}:feedback",
    LEGACY,  # a bare key: chat, feedback, read (today's behaviour)
)
SECRETS = (ALICE, BOB, OPS, READER, WRITER, LEGACY)
REFUSED_ADAPTER = "math@1"


def fake_vllm() -> Any:
    """A FAKE vLLM OpenAI server: canned answers with a fresh response id and token usage."""
    app = FastAPI()

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": BASE, "object": "model", "root": BASE, "parent": None}]}

    @app.post("/v1/load_lora_adapter")
    async def load(request: Request) -> Any:
        name = (await request.json())["lora_name"]
        if name == REFUSED_ADAPTER:
            return PlainTextResponse(f"cannot read /srv/secret-models/{name}: permission denied", 400)
        return PlainTextResponse("ok")

    @app.post("/v1/chat/completions")
    @app.post("/v1/completions")
    async def complete(request: Request) -> dict[str, Any]:
        body = await request.json()
        chat = "messages" in body
        choice = {"index": 0, "finish_reason": "stop"}
        choice |= {"message": {"role": "assistant", "content": "4"}} if chat else {"text": "4"}
        return {
            "id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}",
            "object": "chat.completion" if chat else "text_completion",
            "created": 0,
            "model": body["model"],
            "choices": [choice],
            "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
        }

    return app


@pytest.fixture(scope="module")
def upstream() -> Iterator[str]:
    thread = GatewayThread(fake_vllm(), startup_timeout_s=30)
    yield thread.url
    thread.stop()


class Served:
    """One gateway on a free port with its registry; `chat`, `rate` and `http` call it with a key."""

    def __init__(self, thread: GatewayThread, registry: Registry, writer: Any) -> None:
        self.thread, self.url, self.registry, self.writer = thread, thread.url, registry, writer

    def http(self, secret: str | None = None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {secret}"} if secret else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=30)

    def chat(self, secret: str) -> str:
        """A chat completion through the real openai client; returns the response id to rate."""
        client = openai.OpenAI(base_url=f"{self.url}/v1", api_key=secret, max_retries=0, timeout=30)
        return client.chat.completions.create(model=BASE, messages=[{"role": "user", "content": "2+2?"}]).id

    def rate(self, secret: str | None, response_id: str, **signal: Any) -> httpx.Response:
        return self.http(secret).post("/v1/feedback", json={"id": response_id, **(signal or {"reward": 1.0})})

    def outcomes(self, response_id: str) -> list[tuple[str | None, float | None, bool | None]]:
        """(key_name, reward, thumbs) of the response's stored outcomes, oldest first (after a flush)."""
        assert self.writer.flush(10)
        path = self.registry.url.removeprefix("sqlite:///")
        with contextlib.closing(sqlite3.connect(path)) as db:
            query = "SELECT key_name, reward, thumbs FROM outcomes WHERE request_id = ? ORDER BY id"
            return [(name, reward, None if thumbs is None else bool(thumbs)) for name, reward, thumbs in
                    db.execute(query, (response_id,))]  # fmt: skip


@contextlib.contextmanager
def serve(
    upstream: str, url: str, tmp_path: Path, keys: tuple[str, ...] = KEYS, registry: Any = None
) -> Iterator[Served]:
    """A gateway over the fake engine (on a fresh registry: no experts, the base model only)."""
    from serving.app import create_app
    from serving.engine import EnginePool
    from serving.gateway import Gateway
    from serving.metrics import GatewayMetrics
    from serving.request_log import RequestLogWriter
    from serving.settings import GatewayConfig

    registry = registry or Registry(url, tmp_path / "store")
    metrics = GatewayMetrics()
    pool = EnginePool(httpx.AsyncClient(), urls=(upstream,), capacity=4, metrics=metrics)
    writer = RequestLogWriter(registry, flush_interval_s=0.05, metrics_registry=metrics.registry)
    config = GatewayConfig(base_name=BASE, api_keys=keys, base_lora_guard=False, poll_interval_s=0.5)
    thread = GatewayThread(
        create_app(Gateway(config, registry, pool, request_log=writer)), startup_timeout_s=60
    )
    try:
        yield Served(thread, registry, writer)
    finally:
        thread.stop()
        registry.close()


@pytest.fixture
def gateway(upstream: str, registry_url: str, tmp_path: Path) -> Iterator[Served]:
    with serve(upstream, registry_url, tmp_path) as served:
        yield served


# ------------------------------------------------------------------------------------- key specs


def test_key_specs_names_and_scopes() -> None:
    assert parse_key_spec("k1") == ("k1", KeyRing(["k1"]).keys[0])
    assert KeyRing(["k1"]).keys[0].name == bare_key_name("k1") and bare_key_name("k1").startswith("key-")
    assert "k1" not in bare_key_name("k1")
    secret, key = parse_key_spec("app:s3:cr:et:chat,read")  # the key may contain ':'
    assert (secret, key.name, key.scopes) == ("s3:cr:et", "app", frozenset({"chat", "read"}))
    assert parse_key_spec("app:sekret")[1].scopes == CLIENT_SCOPES
    admin = parse_key_spec("ops:k:admin")[1]
    assert admin.admin and all(admin.allows(scope) for scope in ("chat", "feedback", "read"))
    assert not parse_key_spec("k")[1].admin  # bare keys are never admins
    assert split_env("k1,k2") == ["k1", "k2"]
    assert split_env(" app:K1:chat,feedback ; ops:K2:admin\nk3,k4 ") == [
        "app:K1:chat,feedback", "ops:K2:admin", "k3", "k4"]  # fmt: skip
    for bad, words in [
        ("app:k:chat,write", "unknown or missing scopes"),
        ("app:k:", "unknown or missing scopes"),
        ("bad name:k", "bad API key name"),
        ("app:", "empty key"),
        ("", "empty --api-key"),
    ]:
        with pytest.raises(ApiKeySpecError, match=words):
            parse_key_spec(bad)
    with pytest.raises(ApiKeySpecError, match="two API keys are named 'app'"):
        KeyRing(["app:k1", "app:k2"])
    assert len(KeyRing(["app:k1", "app:k1"]).keys) == 1


def test_serve_refuses_a_bad_key_spec_before_starting(monkeypatch: pytest.MonkeyPatch) -> None:
    from serving.cli import ServeError, _api_keys

    monkeypatch.setenv("MOEA_API_KEYS", "app:K1:chat,feedback ops:K2:admin")
    assert _api_keys(("k0",)) == ("k0", "app:K1:chat,feedback", "ops:K2:admin")
    monkeypatch.setenv("MOEA_API_KEYS", "app:K1:chat,rule")
    with pytest.raises(ServeError, match="unknown or missing scopes"):
        _api_keys(())


# ------------------------------------------------------------------------------------- feedback


def test_only_the_key_that_made_a_request_may_rate_it_and_may_update_it(gateway: Served) -> None:
    response_id = gateway.chat(ALICE)
    refused = gateway.rate(BOB, response_id)
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "not_your_response"
    assert gateway.rate(ALICE, response_id, thumbs="up").status_code == 200
    assert gateway.rate(ALICE, response_id, thumbs="down").status_code == 200  # same key: an update
    assert gateway.rate(BOB, response_id).status_code == 403
    assert gateway.outcomes(response_id) == [("alice", None, True), ("alice", None, False)]
    path = gateway.registry.url.removeprefix("sqlite:///")
    with contextlib.closing(sqlite3.connect(path)) as db:
        rows = db.execute("SELECT key_name FROM requests WHERE request_id = ?", (response_id,)).fetchall()
    assert rows == [("alice",)]


def test_admin_rates_any_response_and_its_rating_stands(gateway: Served) -> None:
    response_id = gateway.chat(ALICE)
    assert gateway.rate(ALICE, response_id, reward=0.2).status_code == 200
    assert gateway.rate(OPS, response_id, reward=0.9).status_code == 200  # admin override
    again = gateway.rate(ALICE, response_id, reward=0.3)
    assert again.status_code == 409 and again.json()["error"]["code"] == "already_rated"
    first_by_admin = gateway.chat(BOB)
    assert gateway.rate(OPS, first_by_admin, thumbs="down").status_code == 200
    assert gateway.rate(BOB, first_by_admin, thumbs="up").status_code == 409  # the first rating stands
    assert gateway.outcomes(response_id) == [("alice", 0.2, None), ("ops", 0.9, None)]
    assert gateway.outcomes(first_by_admin) == [("ops", None, False)]


def test_unknown_ids_are_404_for_everyone(gateway: Served) -> None:
    for secret in (ALICE, OPS, LEGACY):
        response = gateway.rate(secret, "chatcmpl-never-issued")
        assert response.status_code == 404 and response.json()["error"]["code"] == "response_not_found"


def test_feedback_on_another_gateway_or_after_a_restart_uses_the_request_log(
    upstream: str, registry_url: str, tmp_path: Path
) -> None:
    """Gateway B (same registry, empty memory — as after a restart) decides from the request log that
    gateway A wrote; the first-rating rule holds across gateways too."""
    with serve(upstream, registry_url, tmp_path) as first:
        by_alice, by_bob, by_legacy = first.chat(ALICE), first.chat(BOB), first.chat(LEGACY)
        assert first.rate(BOB, by_bob).status_code == 200
        assert first.writer.flush(10)
        with serve(upstream, registry_url, tmp_path / "b") as second:
            assert second.rate(BOB, by_alice).status_code == 403
            assert second.rate(ALICE, by_alice, reward=0.5).status_code == 200
            assert second.rate(LEGACY, by_legacy, reward=0.1).status_code == 200  # bare keys own theirs too
            assert second.rate(OPS, by_bob, reward=0.0).status_code == 200
            assert second.rate(ALICE, "chatcmpl-from-nowhere").status_code == 404
            assert second.outcomes(by_alice) == [("alice", 0.5, None)]
        # Back on gateway A, whose memory holds no rating for by_bob's override: the log has it.
        assert first.rate(BOB, by_bob, reward=1.0).status_code == 409


def test_registry_keeps_the_first_rating_when_gateways_race(registry_url: str, tmp_path: Path) -> None:
    """The writer's last word: outcomes that lost the race are refused when written."""
    from datetime import UTC, datetime

    from registry.views import OutcomeRecord

    registry = Registry(registry_url, tmp_path / "store")
    now = datetime.now(UTC)
    refused = registry.record_outcomes([
        OutcomeRecord("r1", now, reward=1.0, key_name="alice"),
        OutcomeRecord("r1", now, reward=0.0, key_name="bob"),  # another key: refused
        OutcomeRecord("r1", now, reward=0.5, key_name="alice"),  # update by the first key
        OutcomeRecord("r2", now, thumbs=True, key_name="alice"),
        OutcomeRecord("r2", now, thumbs=False, key_name="ops", override=True),  # admin
    ])  # fmt: skip
    assert [(o.request_id, o.key_name) for o in refused] == [("r1", "bob")]
    assert registry.record_outcomes([OutcomeRecord("r2", now, thumbs=True, key_name="alice")])  # ops's stands
    registry.close()


# ------------------------------------------------------------------------------------- scopes


@pytest.mark.parametrize(
    ("secret", "chat", "models", "metrics", "feedback"),
    [
        (ALICE, 200, 200, 403, 404),  # chat,feedback (404: the feedback id is unknown, auth passed)
        (READER, 403, 200, 200, 403),  # read
        (WRITER, 403, 403, 403, 404),  # feedback
        (OPS, 200, 200, 200, 404),  # admin
        (LEGACY, 200, 200, 200, 404),  # bare key: chat, feedback, read
        ("wrong-key", 401, 401, 401, 401),
        (None, 401, 401, 401, 401),
    ],
)
def test_scopes_are_enforced_per_endpoint(
    gateway: Served, secret: str | None, chat: int, models: int, metrics: int, feedback: int
) -> None:
    http = gateway.http(secret)
    body = {"model": BASE, "messages": [{"role": "user", "content": "hi"}]}
    got = (
        http.post("/v1/chat/completions", json=body).status_code,
        http.get("/v1/models").status_code,
        http.get("/metrics").status_code,
        http.post("/v1/feedback", json={"id": "chatcmpl-x", "reward": 1}).status_code,
    )
    assert got == (chat, models, metrics, feedback)
    refused = http.post("/v1/chat/completions", json=body)
    if refused.status_code == 403:
        assert refused.json()["error"]["code"] == "insufficient_scope"
    assert http.post("/v1/completions", json={"model": BASE, "prompt": "x"}).status_code == chat


# ------------------------------------------------------------------------------------- health


def test_health_without_a_key_says_only_up_or_down(gateway: Served) -> None:
    anonymous = gateway.http().get("/health")
    assert anonymous.status_code == 200 and anonymous.json() == {"status": "ok"}
    for secret in (READER, OPS, LEGACY):
        details = gateway.http(secret).get("/health").json()
        assert details["status"] == "ok" and details["engines"][0]["healthy"] is True, secret
    assert gateway.http(WRITER).get("/health").status_code == 403  # no read scope
    assert gateway.http("wrong-key").get("/health").status_code == 401


def test_health_on_a_gateway_without_keys_shows_details(
    upstream: str, registry_url: str, tmp_path: Path
) -> None:
    with serve(upstream, registry_url, tmp_path, keys=()) as open_gateway:
        assert "engines" in open_gateway.http().get("/health").json()
        response_id = open_gateway.chat("anything")
        assert open_gateway.rate(None, response_id, reward=0.1).status_code == 200  # no keys: anyone rates
        assert open_gateway.rate("x", response_id, reward=0.2).status_code == 200
        assert open_gateway.outcomes(response_id) == [(None, 0.1, None), (None, 0.2, None)]


# ------------------------------------------------------------------------------------- 500s


class BrokenLogRegistry(Registry):
    """A real registry whose request-log read fails (a database outage) with text that must not leak."""

    def rating_state(self, request_id: str) -> Any:
        raise RuntimeError("could not connect to postgresql://moea:hunter2@db.internal/registry")


def test_500_answers_a_request_id_not_the_exception_text(
    upstream: str, registry_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    broken = BrokenLogRegistry(registry_url, tmp_path / "store")
    with (
        caplog.at_level(logging.ERROR, logger="moea.serving.gateway"),
        serve(upstream, registry_url, tmp_path, registry=broken) as gateway,
    ):
        response = gateway.rate(ALICE, "chatcmpl-not-in-memory")
    assert response.status_code == 500
    error = response.json()["error"]
    assert "hunter2" not in response.text and "RuntimeError" not in response.text
    request_id = response.headers["x-request-id"]
    assert error["code"] == "internal_error" and request_id in error["message"]
    logged = [r for r in caplog.records if request_id in r.getMessage()]
    assert logged and "hunter2" in str(logged[0].exc_info[1])


def test_500_from_an_adapter_the_engine_refused_keeps_the_engine_text_in_the_log(
    upstream: str, registry_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """math@2 serves (loaded at start); pinning math@1 makes the FAKE engine refuse the load."""
    from .registry_fixtures import make_run_dir

    registry = Registry(registry_url, tmp_path / "store")
    for seed in (1, 2):
        registry.register_run(make_run_dir(tmp_path, ["math"], seed))
    registry.promote("math@2", "prod")  # the first registration set prod to math@1
    with (
        caplog.at_level(logging.ERROR, logger="moea.serving.gateway"),
        serve(upstream, registry_url, tmp_path, registry=registry) as gateway,
    ):
        body = {"model": "math@1", "messages": [{"role": "user", "content": "hi"}]}
        response = gateway.http(ALICE).post("/v1/chat/completions", json=body)
    assert response.status_code == 500 and response.json()["error"]["code"] == "adapter_load_failed"
    assert "secret-models" not in response.text and response.headers["x-request-id"] in response.text
    logged = [r.getMessage() for r in caplog.records if response.headers["x-request-id"] in r.getMessage()]
    assert logged and "secret-models" in logged[0]


# ------------------------------------------------------------------------------------- engine key


def test_engine_key_reaches_vllm_through_its_environment_not_its_argv(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Start a VLLMProcess whose interpreter is a FAKE (a script recording its argv and VLLM_API_KEY)."""
    from serving.vllm_process import EngineSettings, VLLMProcess

    record = tmp_path / "child.json"
    fake_python = tmp_path / "python"
    fake_python.write_text(
        f"#!{sys.executable}\nimport json, os, sys\n"
        f"json.dump({{'argv': sys.argv, 'key': os.environ.get('VLLM_API_KEY')}}, open({str(record)!r}, 'w'))\n"
    )
    fake_python.chmod(fake_python.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setattr(sys, "executable", str(fake_python))
    settings = EngineSettings(
        model="/m", served_name=BASE, api_key="engine-secret-31f0", log_path=tmp_path / "log"
    )
    assert "engine-secret-31f0" not in " ".join(settings.command(1234))
    process = VLLMProcess(settings)
    process.start()
    try:
        process._popen.wait(30)  # type: ignore[union-attr]
    finally:
        process.stop(timeout_s=5)
    seen = json.loads(record.read_text())
    assert seen["key"] == "engine-secret-31f0"
    assert seen["argv"][1:3] == ["-m", "vllm.entrypoints.openai.api_server"] and "--model" in seen["argv"]
    assert not any("engine-secret" in arg for arg in seen["argv"]) and "--api-key" not in seen["argv"]
    assert "VLLM_API_KEY" not in os.environ


def test_key_names_not_keys_reach_the_database(gateway: Served) -> None:
    for secret in (ALICE, LEGACY):
        gateway.rate(secret, gateway.chat(secret), reward=1.0)
    assert gateway.writer.flush(10)
    raw = Path(gateway.registry.url.removeprefix("sqlite:///"))
    dumped = b"".join(path.read_bytes() for path in raw.parent.glob(raw.name + "*") if path.is_file())
    assert b"alice" in dumped and bare_key_name(LEGACY).encode() in dumped
    assert not any(secret.encode() in dumped for secret in SECRETS)
