"""A FAKE vLLM OpenAI server (a tiny FastAPI app, not vLLM) for gateway tests whose subject is the gateway.

It answers /health, /v1/models, runtime LoRA load/unload and chat completions with a fresh id per answer
(as vLLM does), also streamed (`"stream": true`: vLLM's event shapes, one word per chunk, the usage event when
asked for); chat requests for a LoRA name in `failing` get vLLM's 500 error body instead.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse


def fake_vllm(base: str, failing: frozenset[str] = frozenset()) -> FastAPI:
    """The fake engine serving `base`; `failing` LoRA names answer 500."""
    app = FastAPI()
    loaded: dict[str, str] = {}

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
        if body.get("stream"):
            usage = bool((body.get("stream_options") or {}).get("include_usage"))
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
