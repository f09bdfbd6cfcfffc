"""vLLM engines behind the gateway: start/own a vLLM OpenAI server or connect to replicas by URL, and
keep the right LoRA adapters loaded in each of them.

- :class:`~serving.vllm_process.VLLMProcess` (own module) is a vLLM server started by ``moea serve``.
- :class:`EngineReplica` is one vLLM server (owned or external) with its loaded adapters, in-flight
  counts per adapter and a lock per adapter (loads/unloads of one adapter never overlap).
- :class:`EnginePool` spreads requests over healthy replicas with adapter affinity (rendezvous hash,
  then the less busy of the two best replicas), loads the *required* adapters (serving versions and
  experiment arms) into every replica, loads pinned versions on demand, unloads adapters nobody uses
  any more, and restarts owned engines that die.

vLLM's runtime LoRA API (needs ``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True`` in the engine's env):
``POST /v1/load_lora_adapter {"lora_name", "lora_path"}`` registers a name and preloads the weights;
``POST /v1/unload_lora_adapter {"lora_name"}`` only forgets the name (requests already running keep
their adapter). The engine keeps at most ``--max-cpu-loras`` adapters in host memory (LRU; evicted
ones are reloaded from disk on use) and at most ``--max-loras`` per batch. The pool therefore keeps at
most ``capacity`` names registered per replica, evicting on-demand adapters first.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from .metrics import GatewayMetrics
from .vllm_process import EngineError, EngineSettings, VLLMProcess

log = logging.getLogger("moea.serving.engine")
RECOVERY_LOG_EVERY = 30
"""A replica that stays down is logged when a recovery fails for a new reason (the first time too), and
otherwise on every this many failures (with 1 s health checks: twice a minute, not every second while
vLLM restarts)."""


class EngineUnavailable(EngineError):
    """No healthy engine replica can take the request right now (starting, restarting or down)."""


@dataclass(eq=False)
class EngineReplica:
    """One vLLM server and the adapters the gateway has registered in it."""

    url: str
    capacity: int
    process: VLLMProcess | None = None
    healthy: bool = False
    loaded: dict[str, str] = field(default_factory=dict)
    """Adapter name → path registered in this engine."""
    last_used: dict[str, float] = field(default_factory=dict)
    in_use: Counter[str] = field(default_factory=Counter)
    """Adapter name → requests routed to this replica and not finished (held leases)."""
    inflight: int = 0
    locks: dict[str, asyncio.Lock] = field(default_factory=dict)
    failures: int = 0
    """Failed recoveries in a row (0 while healthy)."""
    last_error: str | None = None
    """Why the last recovery failed (logged when it changes)."""

    @property
    def name(self) -> str:
        """Label used in metrics and logs."""
        return self.url.removeprefix("http://").removeprefix("https://")

    def lock(self, adapter: str) -> asyncio.Lock:
        """The lock that serialises loads/unloads of one adapter in this replica."""
        return self.locks.setdefault(adapter, asyncio.Lock())


@dataclass
class Lease:
    """A request's hold on one adapter in one replica; the adapter is not unloaded while held."""

    replica: EngineReplica
    adapter: str | None
    path: str | None = None
    released: bool = False


def _affinity(replica: EngineReplica, adapter: str | None) -> int:
    key = f"{adapter or ''}|{replica.url}".encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "big")


class EnginePool:
    """The engine replicas behind one gateway, with adapter bookkeeping and supervision."""

    def __init__(
        self,
        client: httpx.AsyncClient,
        *,
        settings: EngineSettings | None = None,
        urls: tuple[str, ...] = (),
        capacity: int = 4,
        api_key: str | None = None,
        metrics: GatewayMetrics | None = None,
        health_interval_s: float = 1.0,
    ) -> None:
        if not urls and settings is None:
            raise EngineError("give engine settings (to start vLLM) or at least one --engine-url")
        self.client = client
        self.settings = settings
        self.metrics = metrics or GatewayMetrics()
        self.health_interval_s = health_interval_s
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        if urls:
            self.replicas = [EngineReplica(url.rstrip("/"), capacity) for url in urls]
        else:
            assert settings is not None
            process = VLLMProcess(settings)
            self.replicas = [EngineReplica(process.url, settings.adapter_capacity, process=process)]
        self.required: dict[str, str] = {}
        self._dropped: set[str] = set()
        self._supervisor: asyncio.Task[None] | None = None
        self._restarting: set[EngineReplica] = set()
        self.admission: Callable[[EngineReplica], Awaitable[None]] | None = None
        """Run on a replica that comes back (not at start) once its required adapters are loaded, before it
        takes traffic; an EngineError keeps it out until the next recovery (the gateway's golden-prompt
        check, serving/golden_check.py)."""

    # ---- lifecycle ---------------------------------------------------------------------------------
    async def start(self) -> None:
        """Start owned engines (or check the external ones) and wait until every replica is healthy."""
        for replica in self.replicas:
            if replica.process is not None:
                replica.process.start()
        await asyncio.gather(*(self._bring_up(replica, first=True) for replica in self.replicas))
        self._supervisor = asyncio.create_task(self._supervise(), name="moea-engine-supervisor")

    async def close(self) -> None:
        """Stop supervision and every owned engine process."""
        if self._supervisor is not None:
            self._supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._supervisor
        for replica in self.replicas:
            replica.healthy = False
            if replica.process is not None:
                await asyncio.to_thread(replica.process.stop)

    async def _bring_up(self, replica: EngineReplica, *, first: bool = False) -> None:
        """Wait for /health, learn which adapters it has, load the required ones, mark healthy."""
        if replica.process is not None:
            await replica.process.wait_healthy(self.client)
        elif first and not await self._probe(replica):
            raise EngineError(
                f"engine {replica.url} is not healthy (GET /health failed): start it or fix --engine-url"
            )
        await self._sync_loaded(replica)
        # Every required adapter before the replica takes traffic, including ones `set_required` added
        # while these loads (or the admission check) ran: the last check and `healthy = True` happen with
        # no await in between.
        while True:
            while missing := [(n, p) for n, p in self.required.items() if n not in replica.loaded]:
                for name, path in missing:
                    await self._load(replica, name, path)
            if first or self.admission is None:
                break
            await self.admission(replica)
            if all(name in replica.loaded for name in self.required):
                break
        replica.healthy = True
        replica.failures, replica.last_error = 0, None
        self.metrics.engine_healthy.labels(replica.name).set(1)
        log.info("engine %s healthy with %d adapters", replica.url, len(replica.loaded))

    async def _probe(self, replica: EngineReplica) -> bool:
        try:
            response = await self.client.get(f"{replica.url}/health", headers=self.headers, timeout=3.0)
        except httpx.HTTPError:
            return False
        return response.status_code == 200

    async def _sync_loaded(self, replica: EngineReplica) -> None:
        """Forget what we believed was loaded; keep only adapters the engine really lists."""
        response = await self.client.get(f"{replica.url}/v1/models", headers=self.headers, timeout=10.0)
        response.raise_for_status()
        listed = {
            card["id"]: card.get("root", "") for card in response.json().get("data", []) if card.get("parent")
        }
        replica.loaded = {name: str(path) for name, path in listed.items()}
        self.metrics.loaded_adapters.labels(replica.name).set(len(replica.loaded))

    async def _supervise(self) -> None:
        """Watch replicas: restart owned engines that died, re-admit external ones that recover."""
        while True:
            await asyncio.sleep(self.health_interval_s)
            for replica in self.replicas:
                if replica in self._restarting:
                    continue
                alive = replica.process.running if replica.process is not None else await self._probe(replica)
                if alive and replica.healthy:
                    continue
                if not alive:
                    self.mark_down(replica, "process exited" if replica.process else "health check failed")
                self._restarting.add(replica)
                asyncio.create_task(self._recover(replica), name=f"moea-recover-{replica.name}")

    def mark_down(self, replica: EngineReplica, reason: str) -> None:
        """Take a replica out of rotation (requests go elsewhere or get 503 until it recovers)."""
        if replica.healthy:
            log.warning("engine %s down: %s", replica.url, reason)
        replica.healthy = False
        self.metrics.engine_healthy.labels(replica.name).set(0)

    async def _recover(self, replica: EngineReplica) -> None:
        try:
            if replica.process is not None and not replica.process.running:
                log.warning(
                    "vLLM (pid %s) exited with %s; restarting",
                    replica.process.pid,
                    replica.process.returncode,
                )
                await asyncio.to_thread(replica.process.stop, 5.0)  # sweep leftover engine-core children
                replica.loaded.clear()
                replica.process.start()
                self.metrics.engine_restarts.labels(replica.name).inc()
            await self._bring_up(replica)
        except (EngineError, httpx.HTTPError) as error:
            replica.failures += 1
            previous, replica.last_error = replica.last_error, str(error)
            # logged when the reason changes, else every RECOVERY_LOG_EVERY-th failure (not every second)
            if previous != replica.last_error or replica.failures % RECOVERY_LOG_EVERY == 0:
                log.error(
                    "engine %s not recovered yet after %d tries (%s); retrying every %.0f s",
                    replica.url,
                    replica.failures,
                    error,
                    self.health_interval_s,
                )
        finally:
            self._restarting.discard(replica)

    # ---- request placement -------------------------------------------------------------------------
    @property
    def healthy_replicas(self) -> list[EngineReplica]:
        """Replicas currently in rotation."""
        return [replica for replica in self.replicas if replica.healthy]

    def pick(self, adapter: str | None) -> EngineReplica:
        """The replica for a request: best two by adapter affinity, then the less busy one."""
        healthy = self.healthy_replicas
        if not healthy:
            raise EngineUnavailable(
                "no healthy engine: vLLM is starting or restarting, retry in a few seconds"
            )
        if len(healthy) == 1:
            return healthy[0]
        ranked = sorted(healthy, key=lambda replica: _affinity(replica, adapter), reverse=True)[:2]
        return min(ranked, key=lambda replica: replica.inflight)

    async def acquire(self, adapter: str | None, path: str | None) -> Lease:
        """Pick a replica and make sure `adapter` (None = base model) is loaded in it; hold it. A replica
        that turns out unreachable while loading is marked down and another one is picked, once."""
        for attempt in range(2):
            replica = self.pick(adapter)
            replica.inflight += 1
            lease = Lease(replica, adapter, path)
            if adapter is None:
                return lease
            replica.in_use[adapter] += 1  # before any await: an unload in progress must see this lease
            try:
                if adapter not in replica.loaded:
                    if path is None:
                        raise EngineError(f"adapter {adapter} has no artifact path")
                    await self.ensure_loaded(replica, adapter, path)
            except EngineUnavailable:
                self.release(lease)
                if attempt or replica.healthy:
                    raise
                continue
            except BaseException:
                self.release(lease)
                raise
            replica.last_used[adapter] = time.monotonic()
            return lease
        raise AssertionError("unreachable")

    def release(self, lease: Lease) -> None:
        """Give a lease back (idempotent)."""
        if lease.released:
            return
        lease.released = True
        lease.replica.inflight -= 1
        if lease.adapter is not None:
            lease.replica.in_use[lease.adapter] -= 1
            if lease.replica.in_use[lease.adapter] <= 0:
                del lease.replica.in_use[lease.adapter]

    # ---- adapters ------------------------------------------------------------------------------------
    async def ensure_loaded(self, replica: EngineReplica, adapter: str, path: str) -> None:
        """Load `adapter` into `replica` unless it is there; evict unused on-demand adapters first."""
        async with replica.lock(adapter):
            if adapter in replica.loaded:
                return
            await self._evict_for(replica, keep=adapter)
            await self._post_load(replica, adapter, path)

    async def _load(self, replica: EngineReplica, adapter: str, path: str) -> None:
        async with replica.lock(adapter):
            if adapter not in replica.loaded:
                await self._post_load(replica, adapter, path)

    async def _post_load(self, replica: EngineReplica, adapter: str, path: str) -> None:
        body = {"lora_name": adapter, "lora_path": str(path)}
        try:
            response = await self.client.post(
                f"{replica.url}/v1/load_lora_adapter", json=body, headers=self.headers, timeout=120.0
            )
        except httpx.HTTPError as error:
            self.metrics.adapter_operations.labels("load", "error").inc()
            self.mark_down(replica, f"load of {adapter} failed: {error!r}")
            raise EngineUnavailable(f"engine {replica.url} unreachable while loading {adapter}") from error
        if response.status_code != 200 and "already been loaded" not in response.text:
            self.metrics.adapter_operations.labels("load", "error").inc()
            hint = ""
            if response.status_code == 404 or "runtime" in response.text.lower():
                hint = " (start the engine with VLLM_ALLOW_RUNTIME_LORA_UPDATING=True and --enable-lora)"
            raise EngineError(
                f"engine {replica.url} refused to load {adapter} from {path}: "
                f"{response.status_code} {response.text[:300]}{hint}"
            )
        replica.loaded[adapter] = str(path)
        replica.last_used.setdefault(adapter, time.monotonic())
        self.metrics.adapter_operations.labels("load", "ok").inc()
        self.metrics.loaded_adapters.labels(replica.name).set(len(replica.loaded))
        log.info("loaded %s into %s", adapter, replica.url)

    async def _evict_for(self, replica: EngineReplica, keep: str) -> None:
        """Unload least-recently-used idle on-demand adapters until one more fits in `capacity`."""
        while len(replica.loaded) >= replica.capacity:
            idle = [
                name
                for name in replica.loaded
                if name != keep and name not in self.required and not replica.in_use[name]
            ]
            if not idle:
                log.warning(
                    "engine %s holds %d adapters, all required or busy (capacity %d): loading %s beyond "
                    "capacity; raise --max-cpu-loras", replica.url, len(replica.loaded), replica.capacity, keep,
                )  # fmt: skip
                return
            victim = min(idle, key=lambda name: replica.last_used.get(name, 0.0))
            await self.unload(replica, victim, locked=False)

    async def unload(self, replica: EngineReplica, adapter: str, *, locked: bool = True) -> bool:
        """Unload `adapter` from `replica` if nobody holds it; True when it is gone."""
        lock = replica.lock(adapter) if locked else contextlib.nullcontext()
        async with lock:
            if adapter not in replica.loaded:
                return True
            if replica.in_use[adapter] or adapter in self.required:
                return False
            del replica.loaded[adapter]  # synchronous with the check: new leases will reload it
            replica.last_used.pop(adapter, None)
            try:
                response = await self.client.post(
                    f"{replica.url}/v1/unload_lora_adapter",
                    json={"lora_name": adapter},
                    headers=self.headers,
                    timeout=30.0,
                )
                outcome = "ok" if response.status_code in (200, 404) else "error"
            except httpx.HTTPError:
                outcome = "error"
            self.metrics.adapter_operations.labels("unload", outcome).inc()
            self.metrics.loaded_adapters.labels(replica.name).set(len(replica.loaded))
            log.info("unloaded %s from %s (%s)", adapter, replica.url, outcome)
            return True

    async def set_required(self, adapters: Mapping[str, str | Path]) -> None:
        """Make `adapters` (name → path) the always-loaded set; load new ones into every healthy replica.

        Returns once every healthy replica has them, so a caller may route to them right after.
        Adapters that stop being required are unloaded by :meth:`unload_unused` once no request holds them.
        A replica that becomes healthy meanwhile gets them here; one still coming back sees the new set
        (the last check and the assignment happen with no await in between; :meth:`_bring_up` likewise).
        """
        new = {name: str(path) for name, path in adapters.items()}
        while todo := [
            (replica, name, path)
            for replica in self.healthy_replicas
            for name, path in new.items()
            if name not in replica.loaded
        ]:
            await asyncio.gather(*(self._load(replica, name, path) for replica, name, path in todo))
        self._dropped |= set(self.required) - set(new)
        self._dropped -= set(new)
        self.required = new

    async def unload_unused(self, idle_ttl_s: float = 600.0) -> list[str]:
        """Unload adapters nobody needs: formerly required ones as soon as no request holds them, and
        on-demand (pinned) ones unused for `idle_ttl_s`. Returns the names unloaded (per replica)."""
        removed: list[str] = []
        cutoff = time.monotonic() - idle_ttl_s
        for replica in self.healthy_replicas:
            for name in list(replica.loaded):
                if name in self.required:
                    continue
                if (name in self._dropped or replica.last_used.get(name, 0.0) < cutoff) and await self.unload(
                    replica, name
                ):
                    removed.append(name)
        still_loaded = {name for replica in self.replicas for name in replica.loaded}
        self._dropped &= still_loaded
        return removed
