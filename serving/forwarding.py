"""Forwarding one request to a vLLM replica and relaying its answer: plain JSON (gets the `moea` field)
or a server-sent event stream passed through event by event (the first event gets the `moea` field, the
final usage event is read for metrics and dropped unless the client asked for it).

Retry rule (:meth:`Forwarder.send`): a request is sent at most twice, and a second time only while nothing
of its answer has reached the client — when the replica's connection broke (refused, reset or closed: the
replica died; it is marked down) before the whole JSON answer, or for a stream before the first bytes of
its body; or when the replica had forgotten the adapter. The second try goes to a healthy replica picked
again (the adapter loaded there first). Timeouts are never retried (the engine may still be working), and
a stream that already relayed events just ends (the client has part of an answer).
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import anyio
import httpx
from fastapi.responses import Response, StreamingResponse

from registry.views import RequestRecord

from .content_log import Content
from .engine import EnginePool, EngineUnavailable, Lease
from .errors import APIError, unavailable_error
from .state import Target
from .vllm_process import EngineError

BROKEN = (httpx.NetworkError, httpx.RemoteProtocolError)
"""How a replica's connection fails when the replica went away: refused, reset, or closed before the answer
was complete (a killed vLLM)."""

_USAGE_RE = re.compile(rb'"prompt_tokens":\s*(\d+).*?"completion_tokens":\s*(\d+)', re.S)
_ID_RE = re.compile(rb'"id":\s*"([^"]+)"')


@dataclass
class Exchange:
    """Book-keeping of one forwarded request, finished (metrics, request log) by the gateway."""

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
    key_name: str | None = None
    """Name of the API key that made the request (request log; who may rate the response)."""
    content: Content | None = None
    """The client's messages and the answer text, filled in while relaying (`--log-content` only)."""

    def request_record(self, seconds: float) -> RequestRecord:
        """The request-log record of this finished exchange (`seconds`: how long it took)."""
        content: dict[str, Any] = {}
        if self.content is not None:
            content = {"messages": self.content.messages, "answer": self.content.answer}
        return RequestRecord(
            request_id=self.response_id, created_at=datetime.now(UTC), expert=self.target.expert,
            version=self.target.version, experiment_id=self.target.experiment_id, user=self.user,
            routed=self.target.routed, latency_ms=seconds * 1000.0, prompt_tokens=self.prompt_tokens,
            completion_tokens=self.completion_tokens, status_code=self.status, shadow=self.shadow,
            key_name=self.key_name, **content,
        )  # fmt: skip

    def response_headers(self) -> dict[str, str]:
        """`x-moea-expert`, `x-request-id` and, inside an experiment, `x-moea-experiment`."""
        headers = {"x-moea-expert": self.target.label, "x-request-id": self.response_id}
        if self.target.experiment_id is not None:
            headers["x-moea-experiment"] = str(self.target.experiment_id)
        return headers


@dataclass
class Upstream:
    """A replica's answer to a forwarded request, with the lease it was sent under (the last try's)."""

    lease: Lease
    response: httpx.Response
    head: bytes = b""
    """A stream's first bytes, read before anything reached the client (a replica that dies before them
    can still be replaced)."""
    rest: AsyncIterator[bytes] | None = None
    """The rest of a stream's body (None: not a 200 stream)."""


def _moea_json(target: Target) -> bytes:
    return json.dumps(target.moea_field(), separators=(",", ":")).encode()


class Forwarder:
    """Sends requests to the pool's replicas with its shared pooled httpx client; every exchange it
    answers is handed to `finish` exactly once."""

    def __init__(
        self, pool: EnginePool, *, request_timeout_s: float, finish: Callable[[Exchange], None]
    ) -> None:
        self.pool = pool
        self.client = pool.client
        self.request_timeout_s = request_timeout_s
        self.finish = finish

    async def lease(self, adapter: str | None, adapter_path: str | None) -> Lease:
        """A hold on `adapter` in some replica; engine trouble as a 503 / 500 APIError."""
        try:
            return await self.pool.acquire(adapter, adapter_path)
        except EngineUnavailable as error:
            raise unavailable_error(str(error)) from None
        except EngineError as error:
            raise APIError(500, str(error), type="server_error", code="adapter_load_failed") from None

    def _upstream_headers(self, request_id: str) -> dict[str, str]:
        return {"content-type": "application/json", "x-request-id": request_id, **self.pool.headers}

    async def send(
        self, lease: Lease, path: str, content: bytes, request_id: str, *, stream: bool
    ) -> Upstream:
        """Send to the lease's replica, and once more to a replica picked again when the first one failed
        before anything reached the client (module docstring: the retry rule); a replica marked down since
        it was picked is replaced before sending. Releases the lease on failure."""
        try:
            for attempt in range(2):
                while not lease.replica.healthy:  # marked down while this request waited (adapter load)
                    lease = await self._lease_again(lease)
                replica = lease.replica
                self.pool.metrics.engine_requests.labels(replica.name).inc()  # no await since the check
                try:
                    upstream = await self._try(lease, path, content, request_id, stream, last=attempt == 1)
                except BROKEN as error:
                    self.pool.mark_down(replica, f"{type(error).__name__} during a request")
                    if attempt:
                        raise
                    reason = "broken"
                else:
                    if upstream is not None:
                        return upstream
                    replica.loaded.pop(lease.adapter or "", None)  # the engine restarted behind our back
                    reason = "forgotten"
                self.pool.metrics.engine_retries.labels(replica.name, reason).inc()
                lease = await self._lease_again(lease)
        except BaseException:
            self.pool.release(lease)
            raise
        raise AssertionError("unreachable")

    async def _lease_again(self, lease: Lease) -> Lease:
        self.pool.release(lease)
        return await self.lease(lease.adapter, lease.path)

    async def _try(
        self, lease: Lease, path: str, content: bytes, request_id: str, stream: bool, *, last: bool
    ) -> Upstream | None:
        """One try; None when the engine had forgotten the adapter and another try is allowed."""
        request = self.client.build_request(
            "POST",
            lease.replica.url + path,
            content=content,
            headers=self._upstream_headers(request_id),
            timeout=self.request_timeout_s,
        )
        response = await self.client.send(request, stream=stream)
        if response.status_code == 404 and lease.adapter is not None and not last:
            await response.aread()
            if b"does not exist" in response.content:
                return None
        if not stream or response.status_code != 200:
            return Upstream(lease, response)
        rest = response.aiter_raw()
        try:
            head = await anext(rest, b"")
        except BaseException:
            await response.aclose()
            raise
        return Upstream(lease, response, head, rest)

    async def forward(
        self, lease: Lease, path: str, content: bytes, request_id: str, ex: Exchange
    ) -> Response:
        """Forward a non-streaming request; the JSON answer gets the `moea` field."""
        try:
            upstream = await self.send(lease, path, content, request_id, stream=False)
        except httpx.HTTPError as error:
            raise unavailable_error(
                f"engine failed during the request ({type(error).__name__}); retry"
            ) from None
        self.pool.release(upstream.lease)
        response = upstream.response
        body = response.content
        ex.status = response.status_code
        if response.status_code == 200:
            if match := _USAGE_RE.search(body):
                ex.prompt_tokens, ex.completion_tokens = int(match.group(1)), int(match.group(2))
            if match := _ID_RE.search(body):
                ex.response_id = match.group(1).decode()
            if ex.content is not None:
                ex.content.take_body(body)
            body = body.rstrip()[:-1] + b',"moea":' + _moea_json(ex.target) + b"}"
        self.finish(ex)
        return Response(
            body,
            status_code=response.status_code,
            media_type="application/json",
            headers=ex.response_headers(),
        )

    async def forward_stream(
        self, lease: Lease, path: str, content: bytes, request_id: str, ex: Exchange, strip_usage: bool
    ) -> Response:
        """Forward a streaming request: an engine error as its JSON, else the relayed event stream."""
        try:
            upstream = await self.send(lease, path, content, request_id, stream=True)
        except httpx.HTTPError as error:
            raise unavailable_error(
                f"engine failed before the stream started ({type(error).__name__}); retry"
            ) from None
        response = upstream.response
        if response.status_code != 200:
            body = await response.aread()
            await response.aclose()
            self.pool.release(upstream.lease)
            ex.status = response.status_code
            self.finish(ex)
            return Response(body, status_code=response.status_code, media_type="application/json")
        ex.status = 200
        return ClosingStreamingResponse(
            self._relay(response, upstream.lease, ex, strip_usage, upstream.head, upstream.rest),
            media_type="text/event-stream",
            headers=ex.response_headers(),
        )

    async def _relay(
        self, response: httpx.Response, lease: Lease, ex: Exchange, strip_usage: bool,
        head: bytes = b"", rest: AsyncIterator[bytes] | None = None,
    ) -> AsyncIterator[bytes]:  # fmt: skip
        """Pass SSE events through (`head`, then `rest`; by default the response's body); the first gets
        the `moea` field, the final usage event is read (and maybe dropped)."""
        pending = b""
        first: bytes | None = b'data: {"moea":' + _moea_json(ex.target)
        delivered = False  # the client has the whole answer (`data: [DONE]`)
        try:
            async for chunk in _chain(head, rest if rest is not None else response.aiter_raw()):
                pending += chunk
                cut = pending.rfind(b"\n\n")
                if cut < 0:
                    continue
                events, pending = pending[: cut + 2], pending[cut + 2 :]
                if ex.content is not None:
                    ex.content.take_events(events)
                if b'"usage":{' in events and b'"choices":[]' in events:
                    events = take_usage(events, ex, strip_usage)
                if first is not None and events.startswith(b"data: {"):
                    events, first = first + b"," + events[len(b"data: {") :], None
                if events:
                    delivered = b"data: [DONE]" in events  # handed to the server: the answer is out
                    yield events
            if pending:
                yield pending
        except httpx.HTTPError as error:
            ex.status = 503  # engine died mid-stream: the client sees a truncated stream (not retried)
            if isinstance(error, BROKEN):
                self.pool.mark_down(lease.replica, f"{type(error).__name__} during a stream")
        except (asyncio.CancelledError, GeneratorExit):
            # the client went away (cancelled while we wait for the engine, or closed by
            # ClosingStreamingResponse while the server sends); once it has `[DONE]` it may close before the
            # engine's EOF reaches us (the openai client does): the answer was delivered, so it stays a 200
            if not delivered:
                ex.status = 499
            raise
        finally:
            await response.aclose()
            self.pool.release(lease)
            self.finish(ex)


async def _chain(head: bytes, rest: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    if head:
        yield head
    async for chunk in rest:
        yield chunk


class ClosingStreamingResponse(StreamingResponse):
    """A StreamingResponse that closes its body iterator as soon as the stream ends, however it ends.

    Starlette cancels the sending task when the client disconnects; a generator suspended at ``yield`` is
    then only closed when the garbage collector finds it, possibly after the gateway drained its request
    log on shutdown, so the request's record (written by the generator's ``finally``) was lost."""

    async def stream_response(self, send: Any) -> None:
        try:
            await super().stream_response(send)
        finally:
            close = getattr(self.body_iterator, "aclose", None)
            if close is not None:
                with anyio.CancelScope(shield=True):  # runs inside the cancelled scope of the disconnect
                    await close()


def take_usage(events: bytes, ex: Exchange, strip: bool) -> bytes:
    """Read the token counts of the usage event among `events` into `ex`; drop that event when `strip`."""
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
