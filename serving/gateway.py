"""The OpenAI-compatible gateway in front of vLLM: routing, aliases, A/B arms, auth, feedback, metrics.

Request path (one JSON parse, no blocking call on the event loop)::

    read body (size-capped) → json.loads → pydantic model (400 on anything malformed)
      → target: model="moe" → router (micro-batched, in a thread) → expert or base
                model="NAME" → running experiment's arm (sticky per user) or alias prod / latest
                model="NAME@3" / "NAME@prod" / "NAME@latest" → that version;  model=<base> → no LoRA
                (or the all-zero identity LoRA `base@0` while experts are loaded: base-LoRA guard)
      → chat messages as the expert was trained on them (moe_adapters.prompting: its system prompt)
      → lease on a replica (adapter affinity; loads a pinned version on demand)
      → forward with the shared pooled httpx client (streams pass through event by event)
      → headers x-moea-expert / x-moea-experiment, JSON field "moea", metrics, request log record

Registry state is held in memory (:class:`ServingState`), rebuilt in a thread by a watcher task when
``registry.state_token()`` changes, and applied as a whole (serving/state_swap.py): every adapter it needs
is loaded into every engine (and answers its golden prompts, serving/golden_check.py) while the old state
serves, then the snapshot is swapped in one assignment: a request sees the old state or the new one.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError as PydanticValidationError

from moe_adapters.prompting import system_prompt_source, version_prompt_spec
from registry.errors import ValidationError as RefError
from registry.models import parse_ref
from registry.views import OutcomeRecord

from .ab.assign import assign_arm
from .auth import ApiKey, KeyRing, require
from .base_lora import BaseLoraGuard
from .content_log import Content, capture_content
from .engine import EnginePool
from .errors import APIError, unavailable_error, validation_error
from .feedback import FeedbackBook
from .forwarding import Exchange, Forwarder
from .golden_check import GoldenChecker, GoldenCheckFailed
from .lora_slots import LoraSlotError, growth_warning, lora_needs, shortfalls
from .metrics import GatewayMetrics
from .router_runtime import RouterRuntime
from .schemas import ChatCompletionRequest, CompletionRequest, FeedbackRequest
from .settings import GatewayConfig
from .state import ServingState, Target, load_state, pinned_version, upstream_body
from .state_swap import StateChange, catch_up, record_change, warn_unpinned

log = logging.getLogger("moea.serving.gateway")

MOE_MODEL = "moe"
"""The model name that asks the gateway to route."""

_ENDPOINTS: dict[str, tuple[str, type[ChatCompletionRequest] | type[CompletionRequest], str]] = {
    "chat": ("/v1/chat/completions", ChatCompletionRequest, "chatcmpl-"),
    "completions": ("/v1/completions", CompletionRequest, "cmpl-"),
}


class Gateway:
    """State and request handling of one gateway; :func:`serving.app.create_app` wires it into FastAPI."""

    def __init__(
        self,
        config: GatewayConfig,
        registry: Any,
        pool: EnginePool,
        *,
        router: RouterRuntime | None = None,
        request_log: Any | None = None,
        metrics: GatewayMetrics | None = None,
    ) -> None:
        self.config = config
        self.registry = registry
        self.pool = pool
        self.metrics = metrics or pool.metrics
        self.router = router or RouterRuntime(
            self.metrics, device=config.router_device, compile_cpu=config.router_compile
        )
        self.request_log = request_log
        self.forwarder = Forwarder(pool, request_timeout_s=config.request_timeout_s, finish=self._finish)
        self.state: ServingState | None = None
        self._paths: dict[str, str] = {}
        self.feedback_book = FeedbackBook(registry, config.feedback_window)
        self._watcher: asyncio.Task[None] | None = None
        self._refresh_lock = asyncio.Lock()
        self._shadow_slots = asyncio.Semaphore(config.shadow_concurrency)
        self._background: set[asyncio.Task[Any]] = set()
        self.keys = KeyRing(config.api_keys)
        self.base_lora = BaseLoraGuard(config.base_lora_guard)
        self._slot_warning: str | None = None
        self._required: dict[str, str] = {}
        self.golden = GoldenChecker(registry, pool, self.metrics)
        pool.admission = self.golden.check_replica  # a replica that comes back answers its golden prompts
        self.last_change: StateChange | None = None
        """The last registry state change applied (delays also in the moea_state_apply_seconds metric)."""

    # ---- lifecycle -----------------------------------------------------------------------------------
    async def start(self) -> None:
        """Read the registry, load the router (strict), start engines with all required adapters."""
        state = await asyncio.to_thread(load_state, self.registry)
        await self.router.swap(self.registry, state.router, state.experts.keys(), strict=True)
        self.pool.required = self._required = await self.base_lora.with_identity(state.required)
        warn_unpinned(None, state)
        await self._warn_if_slots_short(self.pool.required)
        try:
            await self.pool.start()
        except BaseException:
            await self.pool.close()
            raise
        await self.golden.at_start(state)
        self.state = state
        if self.request_log is not None:
            self.request_log.start()
        self._watcher = asyncio.create_task(self._watch(), name="moea-registry-watcher")
        log.info("gateway ready: %d experts, router %s", len(state.experts), self.router.ref)

    async def close(self) -> None:
        """Stop watching, drain logs, stop owned engines."""
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
        for task in list(self._background):
            task.cancel()
        await self.router.close()
        if self.request_log is not None:
            await asyncio.to_thread(self.request_log.close)
        await self.pool.close()
        self.base_lora.close()

    async def _watch(self) -> None:
        noticed: float | None = None  # first sight of a change not yet served (kept across failed refreshes)
        while True:
            await asyncio.sleep(self.config.poll_interval_s)
            try:
                token = await asyncio.to_thread(self.registry.state_token)
                if self.state is None or token != self.state.token:
                    noticed = noticed or time.monotonic()
                    await self.refresh(noticed)
                    noticed = None
                await self.pool.unload_unused(self.config.idle_adapter_ttl_s)
            except Exception:  # the watcher must survive a flaky database; the old state keeps serving
                self.metrics.state_refreshes.labels("error").inc()
                log.exception("registry refresh failed; still serving the previous state")

    async def refresh(self, noticed: float | None = None) -> None:
        """Apply the registry's current state as a whole (serving/state_swap.py; module docstring)."""
        async with self._refresh_lock:
            noticed = time.monotonic() if noticed is None else noticed
            old, before = self.state, dict(self.pool.required)
            try:
                state, reads = await catch_up(self.registry, self._prepare)
            except GoldenCheckFailed as error:  # a new version answered wrong: keep serving `old`
                return await self.golden.hold_back(before, error)
            if old is not None and state.token == old.token:
                return
            await self.router.swap(self.registry, state.router, state.experts.keys(), strict=False)
            self.state = state  # the swap (no await since the router swap: both change together)
            self.last_change = record_change(self.metrics, old, state, noticed, time.monotonic(), reads)
            await self.pool.set_required(self._required)  # the old state's adapters unload once idle
            self.metrics.state_refreshes.labels("ok").inc()

    async def _prepare(self, state: ServingState) -> None:
        """Load `state`'s adapters into every engine, keeping the served state's ones required meanwhile."""
        self.golden.refuse_known(state)  # before loading: a version that failed its golden check stays out
        self._required = await self.base_lora.with_identity(state.required)
        await self._warn_if_slots_short(self._required)
        await self.pool.set_required({**self.pool.required, **self._required})
        await self.golden.check(state)  # loaded everywhere: it answers its golden prompts before the swap

    # ---- LoRA slots and the base-LoRA guard (serving/base_lora.py says why) ----------------------
    async def _warn_if_slots_short(self, required: dict[str, str]) -> None:
        """Log once per change when the adapters to serve outgrow the engines' LoRA flags (sized at start)."""
        settings = self.pool.settings
        try:
            needs = await asyncio.to_thread(lora_needs, required)
        except LoraSlotError as error:
            message: str | None = str(error)
        else:
            short = shortfalls(
                needs,
                max_loras=settings.max_loras if settings else None,
                max_cpu_loras=min(replica.capacity for replica in self.pool.replicas),
                max_lora_rank=settings.max_lora_rank if settings and settings.enable_lora else None,
            )
            message = growth_warning(short, needs)
        if message is not None and message != self._slot_warning:
            log.warning("%s", message)
        self._slot_warning = message

    def base_adapter(self) -> tuple[str | None, str | None]:
        """(vLLM adapter, path) for a base-model request (see :meth:`BaseLoraGuard.base_adapter`)."""
        return self.base_lora.base_adapter(self.pool)

    # ---- request helpers -----------------------------------------------------------------------------
    def authorize(self, request: Request, *scopes: str) -> ApiKey | None:
        """The caller's key (None without configured keys); 401 without a valid key, 403 when it has
        none of `scopes` (serving/auth.py lists them)."""
        return require(self.keys, request.headers.get("authorization"), *scopes)

    async def read_json(self, request: Request) -> dict[str, Any]:
        """The request body as a JSON object (413 when too large, 400 when not a JSON object)."""
        limit = self.config.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise APIError(
                413, f"Request body of {declared} bytes exceeds the {limit}-byte limit", code="body_too_large"
            )
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise APIError(413, f"Request body exceeds the {limit}-byte limit", code="body_too_large")
            chunks.append(chunk)
        try:
            data = json.loads(b"".join(chunks))
        except (ValueError, UnicodeDecodeError) as error:
            raise APIError(400, f"Request body is not valid JSON: {error}", code="invalid_json") from None
        if not isinstance(data, dict):
            raise APIError(400, "Request body must be a JSON object", code="invalid_json")
        return data

    def _state(self) -> ServingState:
        if self.state is None:
            raise unavailable_error("gateway is starting; retry in a few seconds")
        return self.state

    async def resolve(self, model: str, user: str | None) -> Target:
        """The target of `model` (anything but "moe"), or a 404 APIError (an old `NAME@3` outside the
        snapshot is read from the registry: :func:`serving.state.pinned_version`)."""
        state = self._state()
        if model == self.config.base_name:
            return Target(None)
        try:
            ref = parse_ref(model)
        except RefError:
            ref = None
        entry = state.experts.get(ref.name) if ref else None
        if ref is None or entry is None:
            raise APIError(
                404,
                f"The model `{model}` does not exist: use `moe`, `{self.config.base_name}` or a registered expert "
                "(GET /v1/models lists them), optionally as NAME@VERSION or NAME@ALIAS",
                param="model",
                code="model_not_found",
            )
        experiment = None
        if ref.version is not None:
            version = ref.version
        elif ref.alias is not None:
            version = entry.aliases.get(ref.alias)
        elif ref.latest:
            version = entry.latest
        elif (experiment := state.experiments.get(entry.name)) is not None:
            version = assign_arm(experiment, user)
        else:
            version = entry.serving.version if entry.serving is not None else None
        view = None if version is None else await pinned_version(self.registry, state, entry.name, version)
        if view is None or (view.archived and experiment is None):
            why = f"{view.ref} is archived; " if view is not None else ""
            raise APIError(
                404,
                f"The model `{model}` does not resolve to a servable (registered, not archived) version of "
                f"`{entry.name}` ({why}latest version: {entry.latest}, aliases: {entry.aliases})",
                param="model",
                code="model_not_found",
            )
        return Target(
            view.ref,
            expert=entry.name,
            version=view.version,
            experiment_id=experiment.id if experiment is not None else None,
            path=state.required.get(view.ref),
            shadow_version=experiment.shadow_version if experiment is not None else None,
            prompt=version_prompt_spec(view),
            view=view,
        )

    async def target_for(self, parsed: ChatCompletionRequest | CompletionRequest, user: str | None) -> Target:
        """Route model="moe" through the router; resolve any other model name."""
        if parsed.model != MOE_MODEL:
            return await self.resolve(parsed.model, user)
        decision = await self.router.route(parsed.routing_text())
        if decision is None or decision.label is None:
            confidence = decision.confidence if decision is not None else None
            return Target(None, routed=decision is not None, confidence=confidence)
        target = await self.resolve(decision.label, user)
        return Target(**{**target.__dict__, "routed": True, "confidence": round(decision.confidence, 6)})

    async def adapter_path(self, target: Target) -> str | None:
        """Artifact folder of the target's adapter (verified by the registry once, then cached)."""
        if target.adapter is None or target.path is not None:
            return target.path
        path = self._paths.get(target.adapter)
        if path is None:
            path = self._paths[target.adapter] = str(
                await asyncio.to_thread(self.registry.artifact_path, target.view)
            )
        return path

    # ---- generation ----------------------------------------------------------------------------------
    async def generate(self, request: Request, endpoint: str) -> Response:
        """Handle POST /v1/chat/completions or /v1/completions."""
        started = time.perf_counter()
        path, model_cls, id_prefix = _ENDPOINTS[endpoint]
        request_id = uuid.uuid4().hex
        request.state.request_id = id_prefix + request_id  # as the request log names it; a 500 reports it
        key = self.authorize(request, "chat")
        data = await self.read_json(request)
        try:
            parsed = model_cls.model_validate(data)
        except PydanticValidationError as error:
            raise validation_error(error) from None
        user = parsed.user or request.headers.get("x-moea-user")
        target = await self.target_for(parsed, user)
        if isinstance(data.get("messages"), list):
            target = replace(target, system_prompt=system_prompt_source(data["messages"], target.prompt))
        adapter, adapter_path = target.adapter, await self.adapter_path(target)
        if adapter is None:
            adapter, adapter_path = self.base_adapter()
        upstream = upstream_body(data, target, adapter or self.config.base_name)
        strip_usage = parsed.streaming and not parsed.wants_usage_in_stream
        if strip_usage:  # ask for usage (metrics, request log); the extra chunk is removed again below
            upstream["stream_options"] = {**(data.get("stream_options") or {}), "include_usage": True}
        content = json.dumps(upstream, separators=(",", ":")).encode()
        key_name = key.name if key is not None else None
        exchange = Exchange(endpoint, target, user, id_prefix + request_id, started, key_name=key_name,
                            content=capture_content(self.config.log_content, endpoint, data))  # fmt: skip
        try:
            lease = await self.forwarder.lease(adapter, adapter_path)
            self.metrics.overhead.labels(endpoint).observe(time.perf_counter() - started)
            if target.shadow_version is not None and not parsed.streaming:
                self._spawn_shadow(endpoint, target, user, data, key_name)
            if parsed.streaming:
                return await self.forwarder.forward_stream(
                    lease, path, content, request_id, exchange, strip_usage
                )
            return await self.forwarder.forward(lease, path, content, request_id, exchange)
        except APIError as error:  # engine down or adapter refused: still measured and logged
            exchange.status, exchange.gateway_error = error.status, True
            self._finish(exchange)
            raise

    def _finish(self, ex: Exchange) -> None:
        """Metrics + request log for one finished exchange."""
        seconds = time.perf_counter() - ex.started
        experiment = "" if ex.target.experiment_id is None else str(ex.target.experiment_id)
        label = ex.target.label if not ex.shadow else f"{ex.target.label}:shadow"
        self.metrics.observe_response(
            ex.endpoint, label, experiment, ex.status, seconds, ex.prompt_tokens, ex.completion_tokens
        )
        if ex.status >= 400 and not ex.gateway_error:
            self.metrics.errors.labels(
                ex.endpoint, "engine_error" if ex.status >= 500 else "engine_rejected"
            ).inc()
        if not ex.shadow:
            self.feedback_book.issued(ex.response_id, ex.key_name)
        if self.request_log is not None:
            self.request_log.submit_request(ex.request_record(seconds))

    # ---- shadow traffic ------------------------------------------------------------------------------
    def _spawn_shadow(
        self, endpoint: str, target: Target, user: str | None, data: dict[str, Any], key_name: str | None
    ) -> None:
        """Send a copy to the experiment's shadow version (logged, never returned); skip when saturated."""
        if self._shadow_slots.locked() or target.expert is None or target.shadow_version is None:
            return
        entry = self._state().experts[target.expert]
        view = entry.versions.get(target.shadow_version)
        shadow = Target(
            f"{target.expert}@{target.shadow_version}",
            expert=target.expert,
            version=target.shadow_version,
            experiment_id=target.experiment_id,
            path=self._state().required.get(f"{target.expert}@{target.shadow_version}"),
            prompt=version_prompt_spec(view) if view is not None else None,
            view=view,
        )
        body = json.dumps(upstream_body(data, shadow, shadow.adapter or ""), separators=(",", ":")).encode()
        content = capture_content(self.config.log_content, endpoint, data)
        task = asyncio.create_task(self._shadow(endpoint, shadow, user, body, key_name, content))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _shadow(
        self, endpoint: str, target: Target, user: str | None, body: bytes, key_name: str | None,
        content: Content | None,
    ) -> None:  # fmt: skip
        async with self._shadow_slots:
            request_id = uuid.uuid4().hex
            started = time.perf_counter()
            ex = Exchange(endpoint, target, user, f"shadow-{request_id}", started, shadow=True,
                          key_name=key_name, content=content)  # fmt: skip
            try:
                lease = await self.forwarder.lease(target.adapter, await self.adapter_path(target))
                await self.forwarder.forward(lease, _ENDPOINTS[endpoint][0], body, request_id, ex)
            except APIError as error:  # shadows are best effort: logged, never retried
                ex.status, ex.gateway_error = error.status, True
                self._finish(ex)

    # ---- other endpoints -----------------------------------------------------------------------------
    def models(self, request: Request) -> dict[str, Any]:
        """GET /v1/models: `moe`, the base model and every expert (with its serving version)."""
        self.authorize(request, "chat", "read")
        state = self._state()
        created = int(time.time())
        cards = [
            {
                "id": MOE_MODEL,
                "object": "model",
                "created": created,
                "owned_by": "moea",
                "router": self.router.ref,
            },
            {"id": self.config.base_name, "object": "model", "created": created, "owned_by": "moea"},
        ]
        for name, entry in sorted(state.experts.items()):
            experiment = state.experiments.get(name)
            cards.append(
                {
                    "id": name,
                    "object": "model",
                    "created": created,
                    "owned_by": "moea",
                    "parent": self.config.base_name,
                    "serving_version": entry.serving.version if entry.serving is not None else None,
                    "aliases": entry.aliases,
                    "experiment": experiment.id if experiment is not None else None,
                }
            )
        return {"object": "list", "data": cards}

    async def feedback(self, request: Request) -> dict[str, Any]:
        """POST /v1/feedback: store the outcome of an earlier response for A/B analysis (only the key
        that made the request, or an admin key; the first rating stands — serving/feedback.py)."""
        request.state.request_id = uuid.uuid4().hex
        key = self.authorize(request, "feedback")
        data = await self.read_json(request)
        try:
            parsed = FeedbackRequest.model_validate(data)
        except PydanticValidationError as error:
            raise validation_error(error) from None
        await self.feedback_book.check(parsed.id, key)
        key_name = key.name if key is not None else None
        thumbs = None if parsed.thumbs is None else parsed.thumbs == "up"
        if self.request_log is not None:
            self.request_log.submit_outcome(
                OutcomeRecord(
                    request_id=parsed.id, created_at=datetime.now(UTC), reward=parsed.reward, thumbs=thumbs,
                    key_name=key_name, override=key is not None and key.admin,
                )
            )  # fmt: skip
        self.feedback_book.rated(parsed.id, key_name)
        self.metrics.feedback.labels("reward" if parsed.reward is not None else "thumbs").inc()
        return {"id": parsed.id, "object": "feedback", "accepted": True}

    def health(self, request: Request) -> JSONResponse:
        """GET /health: 200 while at least one engine serves, else 503. Without a key only the status;
        the details (engines, adapters, router, state) need a key with the `read` scope."""
        healthy = bool(self.pool.healthy_replicas) and self.state is not None
        body: dict[str, Any] = {"status": "ok" if healthy else "unavailable"}
        if self.keys.enabled and "authorization" not in request.headers:
            return JSONResponse(body, status_code=200 if healthy else 503)
        self.authorize(request, "read")
        body |= {
            "engines": [
                {
                    "url": replica.url,
                    "healthy": replica.healthy,
                    "pid": replica.process.pid if replica.process is not None else None,
                    "adapters": sorted(replica.loaded),
                }
                for replica in self.pool.replicas
            ],
            "router": self.router.ref,
            "base_adapter": self.base_adapter()[0],
            "state_token": self.state.token if self.state else None,
        }
        return JSONResponse(body, status_code=200 if healthy else 503)
