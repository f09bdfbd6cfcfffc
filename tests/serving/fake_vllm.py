"""A FAKE vLLM OpenAI server (a tiny FastAPI app, not vLLM) for gateway tests whose subject is the gateway.

It answers /health, /v1/models, runtime LoRA load/unload and chat completions with a fresh id per answer
(as vLLM does), also streamed (`"stream": true`: vLLM's event shapes, one word per chunk, the usage event when
asked for); chat requests for a LoRA name in `failing` get vLLM's 500 error body instead. :class:`FakeFaults`
make it hang up on chat requests (the connection closed mid-answer, as when vLLM is killed) or load slowly.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse


class HangUp(Exception):
    """Raised by the fake after it started a response: uvicorn then closes the connection mid-answer."""


@dataclass
class FakeFaults:
    """Faults of one FAKE engine, changeable while it runs (the gateway's picks decide where to put them)."""

    hang_up: set[str] = field(default_factory=set)
    """LoRA names whose chat requests get the connection closed before any byte of the answer body (for a
    non-streamed request: before the JSON; for a stream: before the first event), as a vLLM killed then."""
    hang_up_mid_stream: set[str] = field(default_factory=set)
    """LoRA names whose streams are cut after the first two events (the client already has part of it)."""
    load_delay_s: float = 0.0
    """How long each runtime LoRA load takes (a real engine takes a while; a test may need that window)."""
    loads: list[str] = field(default_factory=list)
    """The LoRA names asked to load, in order, recorded as each load starts."""


def fake_vllm(base: str, failing: frozenset[str] = frozenset(), faults: FakeFaults | None = None) -> FastAPI:
    """The fake engine serving `base`; `failing` LoRA names answer 500; `faults` as :class:`FakeFaults` say.
    `app.state.loaded` is its adapter table (name → path), for tests to read."""
    app = FastAPI()
    loaded: dict[str, str] = {}
    app.state.loaded = loaded
    faults = faults or FakeFaults()

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        cards = [{"id": base, "root": base, "parent": None}]
        return {"data": cards + [{"id": n, "root": p, "parent": base} for n, p in loaded.items()]}

    @app.post("/v1/load_lora_adapter")
    async def load(request: Request) -> str:
        body = await request.json()
        faults.loads.append(body["lora_name"])
        await asyncio.sleep(faults.load_delay_s)
        loaded[body["lora_name"]] = body["lora_path"]
        return "Success"

    @app.post("/v1/unload_lora_adapter")
    async def unload(request: Request) -> str:
        loaded.pop((await request.json())["lora_name"], None)
        return "Success"

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        body = await request.json()
        model = body["model"]
        if model in failing:
            return JSONResponse({"object": "error", "message": "boom", "type": "InternalServerError"}, 500)
        usage = bool((body.get("stream_options") or {}).get("include_usage"))
        if model in faults.hang_up:
            return StreamingResponse(_cut(_events(model, usage), 0), media_type="text/event-stream")
        if body.get("stream") and model in faults.hang_up_mid_stream:
            return StreamingResponse(_cut(_events(model, usage), 2), media_type="text/event-stream")
        if body.get("stream"):
            return StreamingResponse(_events(model, usage), media_type="text/event-stream")
        message = {"role": "assistant", "content": f"hello from {model}"}
        return JSONResponse(
            {
                "id": f"chatcmpl-{uuid.uuid4().hex}",
                "object": "chat.completion",
                "created": 0,
                "model": model,
                "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7},
            }
        )

    return app


async def _cut(events: Iterator[bytes], keep: int) -> AsyncIterator[bytes]:
    """The first `keep` events, then the connection closed (the response headers are already out)."""
    for _, event in zip(range(keep), events, strict=False):
        yield event
    await asyncio.sleep(0.05)  # let the kept events leave before the connection is cut
    raise HangUp


def _events(model: str, usage: bool) -> Iterator[bytes]:
    """The server-sent events of a streamed `hello from MODEL`, shaped as vLLM sends them."""
    head = {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion.chunk",
        "created": 0,
        "model": model,
    }
    words = f"hello from {model}".split(" ")
    deltas = [{"role": "assistant", "content": ""}] + [
        {"content": word if index == 0 else " " + word} for index, word in enumerate(words)
    ]
    for delta in deltas:
        yield _event(head | {"choices": [{"index": 0, "delta": delta, "finish_reason": None}]})
    yield _event(head | {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
    if usage:
        yield _event(
            head | {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}}
        )
    yield b"data: [DONE]\n\n"


def _event(payload: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(payload).encode() + b"\n\n"
