"""Golden-prompt check on load: a version answers its golden prompts before it takes traffic.

vLLM has shipped wrong outputs from dynamically loaded adapters, so when a registry change brings a
version in, the gateway (serving/state_swap.py: after the new state's adapters are loaded into every
engine, before the swap) sends the version's recorded golden prompts to every engine that loaded it,
greedily, through the chat endpoint with the version's system prompt (the request path's rule), and
compares the answers with the ones recorded when the version was scored on its golden set
(`moea registry promote`, moe_adapters/eval_gate.py: the first rows, vLLM's offline engine).

- Opt-in per expert: a version without recorded answers (no golden set, or never scored on it) is not
  checked (one registry read, counted as ``skipped``).
- Match: the answer text, surrounding whitespace ignored. bf16 greedy decoding can flip a near-tie
  between the offline engine and the server, so up to :data:`GOLDEN_TOLERANCE` answers may differ
  (1 of 3), as long as at least one matches.
- A version that fails is not swapped in: the whole new state is held back and the gateway keeps
  serving the old one (a state is applied as a whole), logs the differing answers, sets
  ``moea_golden_check_failed{adapter} 1`` and counts ``moea_golden_checks_total{outcome="failed"}``. The
  verdict is kept for the gateway's lifetime (versions are immutable), so later polls do not load or
  probe it again; the registry must move off it (`moea registry rollback`, or promote another version)
  for changes to flow again. The gateway writes nothing to the registry: the failure is the engine's
  load as much as the version's, and other gateways may load it fine.
- The versions a gateway starts with are checked too, after its engines start; a failure there is
  logged and counted (there is no older state to keep serving).
- A replica that comes back (an engine restarted, or an external one re-admitted) loads every serving
  adapter again, and every version that passed its check answers its golden prompts on that replica
  before the replica takes traffic (``EnginePool.admission``); a wrong answer keeps the replica out of
  rotation (logged, counted as ``failed``) and the next recovery tries again. Versions served although
  they failed at start are not asked again.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from typing import Any

from moe_adapters.prompting import expert_messages, version_prompt_spec
from registry.errors import NotFoundError
from registry.models import parse_ref

from .engine import EngineError, EnginePool, EngineReplica
from .metrics import GatewayMetrics
from .state import ServingState

log = logging.getLogger("moea.serving.gateway")

GOLDEN_TOLERANCE = 1
"""Recorded answers that may differ (bf16 near-tie flips) while at least one matches."""
PROBE_TIMEOUT_S = 120.0


class GoldenCheckFailed(RuntimeError):
    """A newly loaded version answered its golden prompts differently from its recorded answers."""


def allowed_differences(total: int, tolerance: int = GOLDEN_TOLERANCE) -> int:
    """How many of `total` probes may differ: `tolerance`, but at least one must match."""
    return max(0, min(tolerance, total - 1))


def differing(expected: list[str], got: list[str]) -> list[int]:
    """Indices whose answers differ (surrounding whitespace ignored)."""
    return [i for i, (a, b) in enumerate(zip(expected, got, strict=True)) if a.strip() != b.strip()]


class GoldenChecker:
    """Checks adapters against their recorded golden answers and remembers each verdict."""

    def __init__(
        self, registry: Any, pool: EnginePool, metrics: GatewayMetrics, tolerance: int = GOLDEN_TOLERANCE
    ) -> None:
        self.registry = registry
        self.pool = pool
        self.metrics = metrics
        self.tolerance = tolerance
        self.passed: set[str] = set()
        self.failed: dict[str, str] = {}
        """Adapter → why it failed."""
        self._held: str | None = None
        self._verified: dict[str, tuple[Any, list[dict[str, Any]]]] = {}
        """Adapter → (prompt spec, probes) of each version that passed: what a replica that comes back
        must answer too."""

    def refuse_known(self, state: ServingState) -> None:
        """Raise before loading anything when `state` needs an adapter that failed already."""
        known = [self.failed[a] for a in state.required if a in self.failed]
        if known:
            raise GoldenCheckFailed("; ".join(known))

    async def check(self, state: ServingState, adapters: Iterable[str] | None = None) -> None:
        """Probe every adapter of `state` not checked yet (in every engine that has it loaded); raise
        :class:`GoldenCheckFailed` naming those that failed."""
        for adapter in set(self.failed) - set(state.required):
            self.metrics.golden_failed.labels(adapter).set(0)
        failures = []
        for adapter in sorted(adapters if adapters is not None else state.required):
            if adapter in self.passed:
                continue
            reason = self.failed.get(adapter) or await self._check_one(state, adapter)
            if reason is None:
                self.passed.add(adapter)
            else:
                self.failed[adapter] = reason
                self.metrics.golden_failed.labels(adapter).set(1)
                failures.append(reason)
        if failures:
            raise GoldenCheckFailed("; ".join(failures))

    async def _check_one(self, state: ServingState, adapter: str) -> str | None:
        view = _version(state, adapter)
        lookup = getattr(self.registry, "golden_probes", None)
        record = None
        if view is not None and lookup is not None:
            try:
                record = await asyncio.to_thread(lookup, view.name, view.version)
            except NotFoundError:
                record = None
        if view is None:
            return None  # not an expert version (the base-LoRA guard's identity adapter)
        if record is None or not record.probes:
            self.metrics.golden_checks.labels("skipped").inc()
            return None
        spec = version_prompt_spec(view)
        reason = await self._probe(adapter, spec, record.probes, self.pool.healthy_replicas)
        if reason is None:
            self._verified[adapter] = (spec, record.probes)
        return reason

    async def check_replica(self, replica: EngineReplica) -> None:
        """Every version that passed and is loaded in ``replica`` answers its golden prompts there
        (``EnginePool.admission``: before a replica that comes back takes traffic); EngineError if not."""
        for adapter in sorted(a for a in self._verified if a in replica.loaded):
            spec, probes = self._verified[adapter]
            reason = await self._probe(adapter, spec, probes, [replica])
            if reason is not None:
                raise EngineError(reason)

    async def _probe(
        self, adapter: str, spec: Any, probes: list[dict[str, Any]], replicas: Iterable[EngineReplica]
    ) -> str | None:
        """Ask ``probes`` on each of ``replicas`` that has ``adapter`` loaded: None, or why it failed."""
        expected = [str(p.get("answer") or "") for p in probes]
        for replica in replicas:
            if adapter not in replica.loaded:
                continue
            got = [await self._ask(replica, adapter, spec, probe) for probe in probes]
            wrong = differing(expected, got)
            if len(wrong) > allowed_differences(len(expected), self.tolerance):
                self.metrics.golden_checks.labels("failed").inc()
                shown = "; ".join(
                    f"#{i + 1} expected {expected[i][:80]!r}, got {got[i][:80]!r}" for i in wrong
                )
                return (
                    f"{adapter} failed its golden-prompt check on {replica.url}: {len(wrong)} of "
                    f"{len(expected)} answers differ from the recorded ones ({shown})"
                )
            if wrong:
                log.info("%s: %d of %d golden answers differ on %s (within tolerance)",
                         adapter, len(wrong), len(expected), replica.url)  # fmt: skip
        self.metrics.golden_checks.labels("passed").inc()
        return None

    async def _ask(self, replica: EngineReplica, adapter: str, spec: Any, probe: dict[str, Any]) -> str:
        body = {
            "model": adapter,
            "messages": expert_messages(probe.get("messages") or [], spec),
            "temperature": 0.0,
            "max_tokens": int(probe.get("max_tokens") or 96),
        }
        response = await self.pool.client.post(
            f"{replica.url}/v1/chat/completions",
            json=body,
            headers=self.pool.headers,
            timeout=PROBE_TIMEOUT_S,
        )
        if response.status_code != 200:
            raise EngineError(
                f"golden-prompt check of {adapter} on {replica.url}: {response.status_code} {response.text[:200]}"
            )
        return str(response.json()["choices"][0]["message"].get("content") or "")

    async def at_start(self, state: ServingState) -> None:
        """Check the adapters a gateway starts with: a failure is logged and counted, not held back."""
        try:
            await self.check(state)
        except GoldenCheckFailed as error:
            log.error("serving at start although a golden-prompt check failed: %s", error)
            for adapter in list(self.failed):  # already serving: later states are not held back by it
                self.passed.add(adapter)
                del self.failed[adapter]

    async def hold_back(self, before: dict[str, str], error: GoldenCheckFailed) -> None:
        """Keep serving the old state: its adapters are the required set again; log once per verdict."""
        await self.pool.set_required(before)
        message = str(error)
        if message != self._held:
            log.error("registry state held back, still serving the previous one: %s", message)
        self._held = message


def _version(state: ServingState, adapter: str) -> Any | None:
    """The version view an adapter name (`name@version`) stands for in `state` (None: not an expert's)."""
    try:
        ref = parse_ref(adapter)
    except ValueError:
        return None
    entry = state.experts.get(ref.name)
    return entry.versions.get(ref.version) if entry is not None and ref.version is not None else None
