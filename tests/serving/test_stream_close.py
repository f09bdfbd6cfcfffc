"""A streamed answer is finished (request log, status) as soon as its stream ends, however it ends.

When the client disconnects, Starlette cancels the task that sends the stream; the relay generator, suspended
at `yield`, used to be closed only by the garbage collector — sometimes after the gateway had drained its
request log on shutdown, so a streamed answer the client read to the end was missing from the log (seen once
in CI). These tests drive the response and the relay directly: the disconnect is a cancellation raised by the
`send` callable, which no real client can time reliably."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from serving.forwarding import ClosingStreamingResponse, Exchange, Forwarder
from serving.state import Target

EVENTS = [b'data: {"choices":[{"delta":{"content":"hi"}}]}\n\n', b"data: [DONE]\n\n"]


def test_a_cancelled_send_closes_the_body_before_the_response_returns() -> None:
    closed: list[str] = []

    async def body() -> AsyncIterator[bytes]:
        try:
            for event in EVENTS:
                yield event
        finally:
            await asyncio.sleep(0)  # an await in the cleanup still runs (shielded from the cancellation)
            closed.append("closed")

    async def send(message: dict[str, Any]) -> None:
        if message.get("body") == EVENTS[0]:
            raise asyncio.CancelledError  # the client went away while this chunk was being sent

    async def run() -> None:
        with pytest.raises(asyncio.CancelledError):
            await ClosingStreamingResponse(body()).stream_response(send)
        assert closed == ["closed"]  # closed by the response itself, not later by the garbage collector

    asyncio.run(run())


class _RecordingPool:
    """Stands in for EnginePool: the relay only releases its lease."""

    def __init__(self) -> None:
        self.released: list[object] = []
        self.client = httpx.AsyncClient()

    def release(self, lease: object) -> None:
        self.released.append(lease)


class _EngineStream(httpx.AsyncByteStream):
    """The engine's event stream, one network chunk per event."""

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for event in EVENTS:
            yield event


async def _relay_until(events_read: int) -> tuple[Exchange, list[Exchange], _RecordingPool]:
    """Relay EVENTS from an engine response, read `events_read` of them, then close the relay as the
    response does when the client disconnects."""
    finished: list[Exchange] = []
    pool = _RecordingPool()
    forwarder = Forwarder(pool, request_timeout_s=5, finish=finished.append)  # type: ignore[arg-type]
    ex = Exchange("chat", Target("summarize@1", "summarize", 1), None, "chatcmpl-1", 0.0, status=200)
    engine = httpx.Response(200, stream=_EngineStream())
    relay = forwarder._relay(engine, "lease", ex, strip_usage=False)  # noqa: SLF001 - the unit under test
    read = b""
    while read.count(b"\n\n") < events_read:
        read += await relay.__anext__()
    await relay.aclose()
    await pool.client.aclose()
    return ex, finished, pool


def test_a_relay_closed_after_done_is_an_answer() -> None:
    ex, finished, pool = asyncio.run(_relay_until(len(EVENTS)))
    assert (ex.status, finished, pool.released) == (200, [ex], ["lease"])


def test_a_relay_closed_before_done_is_a_client_disconnect() -> None:
    ex, finished, pool = asyncio.run(_relay_until(1))
    assert (ex.status, finished, pool.released) == (499, [ex], ["lease"])
