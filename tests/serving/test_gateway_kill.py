"""`kill -9` of a real `moea serve` process mid-traffic: every answered request ends up in the request log
exactly once, once a new gateway runs on the same registry and spool.

The gateway is the real one (`python -m serving.cli_root serve` in its own process group, real SQLite
registry, real spool, the real `openai` client). The engine behind it is a FAKE vLLM (a tiny FastAPI app
in this process, not vLLM) that answers every chat request with a fresh id, as vLLM does; what is under
test is the gateway's request log, not generation.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from registry.local import free_port
from registry.service import Registry

from .conftest import GatewayThread
from .fake_vllm import fake_vllm
from .registry_fixtures import make_run_dir

BASE = "SmolLM2-135M-Instruct"  # the base_model_name make_run_dir writes


def start_gateway(
    engine_url: str, registry_url: str, store: Path, spool: Path, log: Path, *extra: str
) -> tuple[subprocess.Popen[bytes], str]:
    """`moea serve` against the fake engine, in its own process group; returns it and its URL once ready."""
    port = free_port()
    command = [
        sys.executable, "-m", "serving.cli_root", "serve", "--engine-url", engine_url,
        "--registry-url", registry_url, "--store-dir", str(store), "--spool-dir", str(spool),
        "--port", str(port), "--no-base-lora-guard", "--no-router-compile", "--log-level", "warning", *extra,
    ]  # fmt: skip
    process = subprocess.Popen(
        command, stdout=log.open("ab"), stderr=subprocess.STDOUT, start_new_session=True
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"moea serve exited with {process.returncode}: {log.read_text()[-2000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return process, url
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    os.killpg(process.pid, signal.SIGKILL)
    raise RuntimeError(f"moea serve was not ready: {log.read_text()[-2000:]}")


@pytest.fixture
def engine() -> Iterator[str]:
    thread = GatewayThread(fake_vllm(BASE))
    try:
        yield thread.url
    finally:
        thread.stop()


@pytest.mark.parametrize("log_content", [False, True], ids=["metadata", "log-content"])
def test_kill_9_of_the_gateway_loses_no_answered_request(
    engine: str, tmp_path: Path, log_content: bool
) -> None:
    registry_url = f"sqlite:///{tmp_path / 'registry.db'}"
    registry = Registry(registry_url, tmp_path / "store")
    registry.register_run(make_run_dir(tmp_path, ["summarize"], 1))
    spool, log = tmp_path / "spool", tmp_path / "gateway.log"
    extra = ("--log-content",) if log_content else ()
    first, url = start_gateway(engine, registry_url, tmp_path / "store", spool, log, *extra)
    answered: list[str] = []
    try:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        for index in range(300):
            response = client.chat.completions.create(
                model="summarize", messages=[{"role": "user", "content": f"hi {index}"}], user=f"u{index}"
            )
            answered.append(response.id)
    finally:
        os.killpg(first.pid, signal.SIGKILL)  # no lifespan, no flush: what was answered must be in the spool
        first.wait()
    logged_at_kill = {r.request_id for r in _logged(registry, answered)}

    second, _ = start_gateway(engine, registry_url, tmp_path / "store", spool, log, *extra)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and len({r.request_id for r in _logged(registry, answered)}) < len(
            answered
        ):
            time.sleep(0.5)
    finally:
        second.send_signal(signal.SIGTERM)
        second.wait(timeout=60)
    rows = _logged(registry, answered)
    ids = [row.request_id for row in rows]
    assert sorted(ids) == sorted(answered), f"{len(set(ids))} of {len(answered)} answered requests logged"
    assert len(ids) == len(set(ids)), "a request was logged twice"
    print(f"logged when killed: {len(logged_at_kill)} of {len(answered)}; after the restart: {len(ids)}")
    content = _content(registry)  # with --log-content each answer's content is stored exactly once too
    assert sorted(content) == (sorted(answered) if log_content else [])
    for index, request_id in enumerate(answered if log_content else []):
        assert content[request_id] == ([{"role": "user", "content": f"hi {index}"}], "hello from summarize@1")
    registry.close()


def _logged(registry: Registry, request_ids: list[str]) -> list[Any]:
    """The request-log rows (not shadow copies) of the given ids, read with plain SQL."""
    import sqlalchemy as sa

    wanted = set(request_ids)
    with registry.engine.connect() as connection:
        rows = connection.execute(sa.text("SELECT request_id FROM requests WHERE shadow = 0")).all()
    return [row for row in rows if row.request_id in wanted]


def _content(registry: Registry) -> dict[str, tuple[Any, str]]:
    """request_id → (messages, answer) of every stored request content; fails when an id is stored twice."""
    import json

    import sqlalchemy as sa

    with registry.engine.connect() as connection:
        rows = connection.execute(sa.text("SELECT request_id, messages, answer FROM request_content")).all()
    assert len(rows) == len({row.request_id for row in rows}), "content stored twice"
    return {row.request_id: (json.loads(row.messages), row.answer) for row in rows}
