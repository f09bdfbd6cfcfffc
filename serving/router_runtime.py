"""The registered router, run on the serving path: loaded from the registry, micro-batched, off the loop.

Concurrent ``await runtime.route(prompt)`` calls are collected for at most ``max_wait_s`` (1 ms by
default) or until ``max_batch`` prompts are waiting, then routed with one forward pass in a worker
thread, so the event loop never blocks on the encoder. A router whose labels name experts that are
not registered is refused, at startup (error) and on swap (the old router keeps serving).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from moe_adapters.router import RouteDecision, Router

from .metrics import GatewayMetrics

log = logging.getLogger("moea.serving.router")

RECENT_DECISIONS = 10_000
"""Router decisions kept in memory for the dashboard (serving/ui)."""


class RouterRuntimeError(RuntimeError):
    """The registered router cannot be served; the message says how to fix it."""


class RouterRegistry(Protocol):
    """The registry calls the runtime makes."""

    def latest_router(self) -> Any: ...

    def router_artifact_path(self, view: Any) -> Path: ...


@dataclass(frozen=True)
class LoadedRouter:
    """A router model with the registry version it came from."""

    router: Router
    ref: str
    labels: tuple[str, ...]


def check_labels(labels: Collection[str], experts: Collection[str], ref: str) -> None:
    """Raise unless every router label is a registered expert."""
    unknown = sorted(set(labels) - set(experts))
    if unknown:
        raise RouterRuntimeError(
            f"{ref} routes to {', '.join(unknown)}, which {'is' if len(unknown) == 1 else 'are'} not registered: "
            "register the run that trained this router (`moea register RUN_DIR`) or archive the router"
        )


def load_router(
    registry: RouterRegistry,
    view: Any,
    experts: Collection[str],
    device: str | None,
    compile_cpu: bool = False,
) -> LoadedRouter:
    """Load a registered router version (blocking: call it in a thread), refusing unknown labels."""
    ref = getattr(view, "ref", f"router@{getattr(view, 'version', '?')}")
    check_labels(view.labels, experts, ref)
    on_cpu = (device or ("cuda" if torch.cuda.is_available() else "cpu")) == "cpu"
    if on_cpu:
        # The serving process decides this for itself (the router library never does): the router shares
        # the cores with vLLM's busy OpenMP threads, and one intra-op thread keeps batch-1 latency in
        # milliseconds where two threads spin-wait into hundreds of ms.
        torch.set_num_threads(1)
    router = Router.load(registry.router_artifact_path(view), device=device)
    check_labels(router.labels, experts, ref)
    if compile_cpu and on_cpu:
        # Inductor freezing (weights folded and prepacked): 5.5 → 3.8 ms per batch-1 route measured.
        log.info("%s: compiled for CPU in %.1f s", ref, router.compile_for_cpu(freezing=True))
    return LoadedRouter(router, ref, tuple(router.labels))


class RouterRuntime:
    """Routes prompts with the current router, batching concurrent requests into one forward pass."""

    def __init__(
        self,
        metrics: GatewayMetrics | None = None,
        *,
        device: str | None = None,
        max_batch: int = 32,
        max_wait_s: float = 0.001,
        compile_cpu: bool = False,
    ) -> None:
        self.metrics = metrics or GatewayMetrics()
        self.device = device
        self.compile_cpu = compile_cpu
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.current: LoadedRouter | None = None
        self._queue: asyncio.Queue[tuple[str, asyncio.Future[RouteDecision]]] | None = None
        self._worker: asyncio.Task[None] | None = None
        self.recent: deque[tuple[float, str | None, float]] = deque(maxlen=RECENT_DECISIONS)
        """(unix time, label or None for abstain, confidence) of the latest decisions (the dashboard's
        confidence histogram; the counters in /metrics have no confidences)."""

    @property
    def ref(self) -> str | None:
        """`router@N` being served, or None."""
        return self.current.ref if self.current else None

    async def swap(
        self, registry: RouterRegistry, view: Any | None, experts: Collection[str], *, strict: bool
    ) -> None:
        """Serve `view` (a RouterVersionView; None → no router) unless it is the one already served.

        `strict` raises on a router that cannot be served (startup); otherwise the error is logged and
        the current router stays.
        """
        ref = None if view is None else getattr(view, "ref", None)
        if self.current is not None and ref == self.current.ref:
            return
        if view is None:
            self.current = None
            return
        try:
            loaded = await asyncio.to_thread(
                load_router, registry, view, experts, self.device, self.compile_cpu
            )
        except Exception as error:
            if strict:
                raise
            log.error("keeping %s: cannot serve %s: %s", self.ref, ref, error)
            return
        self.current = loaded
        log.info("serving %s (labels: %s) on %s", loaded.ref, ", ".join(loaded.labels), loaded.router.device)

    async def route(self, prompt: str) -> RouteDecision | None:
        """The decision for one prompt (None when no router is registered: the base model answers)."""
        if self.current is None:
            return None
        if self._queue is None:
            self._queue = asyncio.Queue()
            self._worker = asyncio.create_task(self._batch_loop(), name="moea-router-batcher")
        future: asyncio.Future[RouteDecision] = asyncio.get_running_loop().create_future()
        await self._queue.put((prompt, future))
        decision = await future
        self.metrics.observe_route(decision.label)
        self.recent.append((time.time(), decision.label, float(decision.confidence)))
        return decision

    async def _batch_loop(self) -> None:
        assert self._queue is not None
        queue = self._queue
        while True:
            batch = [await queue.get()]
            await asyncio.sleep(0)  # let requests that arrived in the same loop turn enqueue
            if not queue.empty():  # concurrent traffic: wait a little for a fuller batch
                await asyncio.sleep(self.max_wait_s)
            while len(batch) < self.max_batch and not queue.empty():
                batch.append(queue.get_nowait())
            await self._run_batch(batch)

    async def _run_batch(self, batch: list[tuple[str, asyncio.Future[RouteDecision]]]) -> None:
        loaded = self.current
        live = [(prompt, future) for prompt, future in batch if not future.done()]
        if loaded is None or not live:
            for _, future in live:
                future.set_result(RouteDecision(None, 0.0, {}))
            return
        self.metrics.router_batch.observe(len(live))
        try:
            decisions = await asyncio.to_thread(loaded.router.route, [prompt for prompt, _ in live])
        except Exception as error:  # a router bug must not hang requests: they fail, the loop lives
            log.exception("router forward pass failed")
            for _, future in live:
                if not future.done():
                    future.set_exception(RouterRuntimeError(f"router failed: {error}"))
            return
        for (_, future), decision in zip(live, decisions, strict=True):
            if not future.done():
                future.set_result(decision)

    async def close(self) -> None:
        """Stop the batching task."""
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
            self._worker = None
            self._queue = None
