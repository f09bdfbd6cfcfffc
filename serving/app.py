"""The FastAPI app of a :class:`~serving.gateway.Gateway`: routes, error handlers, lifespan."""

from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from .errors import APIError, internal_error
from .gateway import Gateway
from .guard_monitor import DEFAULT_INTERVAL_S, GuardMonitor
from .ui import mount_ui

log = logging.getLogger("moea.serving.gateway")


def create_app(gateway: Gateway, *, guard_interval_s: float = DEFAULT_INTERVAL_S) -> FastAPI:
    """The FastAPI app of `gateway`; its lifespan starts and stops engines, watcher, log writer and the
    guardrail monitor (every `guard_interval_s` seconds; serving/guard_monitor.py)."""
    monitor = GuardMonitor(gateway.registry, gateway.metrics, interval_s=guard_interval_s)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await gateway.start()
        monitor.start()
        try:
            yield
        finally:
            await monitor.close()
            await gateway.close()

    app = FastAPI(title="moea gateway", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.gateway = gateway
    app.state.guard_monitor = monitor
    _add_error_handlers(app, gateway)
    _add_routes(app, gateway)
    mount_ui(app, gateway)
    return app


def _add_error_handlers(app: FastAPI, gateway: Gateway) -> None:
    """Every error as the OpenAI error JSON, counted in the gateway's metrics."""

    @app.exception_handler(APIError)
    async def _api_error(request: Request, error: APIError) -> JSONResponse:
        gateway.metrics.errors.labels(_endpoint_label(request), error.code or error.type).inc()
        if error.status == 500:  # e.g. an adapter the engine refused: details (paths, engine text) stay here
            request_id = _request_id(request)
            log.error("%s on %s (request id %s): %s", error.code, request.url.path, request_id, error.message)
            return internal_error(request_id, error.code).response()
        return error.response()

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, error: Exception) -> JSONResponse:
        request_id = _request_id(request)
        log.exception("unexpected error on %s (request id %s)", request.url.path, request_id)
        gateway.metrics.errors.labels(_endpoint_label(request), "internal_error").inc()
        return internal_error(request_id).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        return APIError(
            error.status_code, f"{request.method} {request.url.path}: {error.detail}", code="not_found"
        ).response()


def _add_routes(app: FastAPI, gateway: Gateway) -> None:
    """The OpenAI endpoints plus /v1/feedback, /health and /metrics."""

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await gateway.generate(request, "chat")

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await gateway.generate(request, "completions")

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        return gateway.models(request)

    @app.post("/v1/feedback")
    async def feedback(request: Request) -> dict[str, Any]:
        return await gateway.feedback(request)

    @app.get("/health")
    async def health(request: Request) -> JSONResponse:
        return gateway.health(request)

    @app.get("/metrics")
    async def metrics(request: Request) -> Response:
        gateway.authorize(request, "read")
        from prometheus_client import REGISTRY, generate_latest

        # Process-wide collectors (request-log writer, process stats) + this gateway's own registry.
        body = generate_latest(REGISTRY) + gateway.metrics.render()
        return Response(body, media_type=gateway.metrics.content_type)


def _request_id(request: Request) -> str:
    """The id the gateway gave this request (chat, completions, feedback), else a fresh one."""
    return getattr(request.state, "request_id", None) or uuid.uuid4().hex


def _endpoint_label(request: Request) -> str:
    path = request.url.path
    return (
        "chat"
        if path.endswith("chat/completions")
        else "completions"
        if path.endswith("/completions")
        else path
    )
