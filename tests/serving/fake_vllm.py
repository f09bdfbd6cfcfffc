"""A FAKE vLLM OpenAI server (a tiny FastAPI app, not vLLM) for gateway tests whose subject is the gateway.

It answers /health, /v1/models, runtime LoRA load/unload and chat completions with a fresh id per answer
(as vLLM does); chat requests for a LoRA name in `failing` get vLLM's 500 error body instead.
"""

from __future__ import annotations

import uuid
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse


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
    async def chat(request: Request) -> JSONResponse:
        model = (await request.json())["model"]
        if model in failing:
            return JSONResponse({"object": "error", "message": "boom", "type": "InternalServerError"}, 500)
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
