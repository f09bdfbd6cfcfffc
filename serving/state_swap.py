"""Applying a new registry state as a whole: prepare it while the old one serves, then swap in one step.

The gateway's watcher notices a new state token; :func:`catch_up` reads the registry state
(:func:`serving.state.load_state`, one consistent snapshot) and has the gateway load every adapter it
needs into every engine while requests keep resolving against the old snapshot. Loading takes seconds
(vLLM loads adapters one after the other: ~3 s each on CPU), and people change the registry in steps
(register, promote, start an experiment), so when the registry moved on while the adapters were
loading, the newer state is read and prepared too (only its extra adapters load) instead of publishing
a state that is already outdated. Once loaded, a newly required version with recorded golden answers
must answer its golden prompts (serving/golden_check.py), else the state is held back. The gateway then replaces its snapshot with one assignment: a request
resolves against the old state or the new one, never a mix. :class:`StateChange` records how long that
took (watcher noticed the change → snapshot swapped); it is logged and observed in the
``moea_state_apply_seconds`` histogram.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from registry.versions import DEFAULT_ALIAS

from .metrics import GatewayMetrics
from .state import ServingState, load_state

log = logging.getLogger("moea.serving.gateway")

CATCH_UP_READS = 4
"""At most this many registry reads per swap; after that the last state read and loaded is served even if
the registry has moved on again (the watcher applies the newer one next), so constant writes cannot stall
the gateway on an old state forever."""


@dataclass(frozen=True)
class StateChange:
    """One applied registry state change."""

    from_token: str | None
    to_token: str
    noticed_at: float
    """``time.monotonic()`` when the watcher first saw a token different from the one served."""
    swapped_at: float
    """``time.monotonic()`` right after the new snapshot replaced the old one."""
    adapters_loaded: int
    """Adapters the new state requires that the old one did not (in every engine before the swap; some may
    have been loaded already, on demand)."""
    reads: int
    """Registry reads it took (more than one when the registry changed again while adapters loaded)."""

    @property
    def seconds(self) -> float:
        """Noticed → swapped."""
        return self.swapped_at - self.noticed_at


async def catch_up(
    registry: Any, prepare: Callable[[ServingState], Awaitable[None]], reads: int = CATCH_UP_READS
) -> tuple[ServingState, int]:
    """The registry's current state, prepared (`prepare` loads its adapters), and the number of reads.

    After each `prepare`, the state token is read again; if it moved, the newer state is read and
    prepared as well, up to `reads` reads.
    """
    state = await asyncio.to_thread(load_state, registry)
    done = 1
    while True:
        await prepare(state)
        if done >= reads or await asyncio.to_thread(registry.state_token) == state.token:
            return state, done
        state = await asyncio.to_thread(load_state, registry)
        done += 1


def record_change(
    metrics: GatewayMetrics, old: ServingState | None, new: ServingState, noticed_at: float,
    swapped_at: float, reads: int,
) -> StateChange:  # fmt: skip
    """Log the swap from `old` to `new`, observe its delay in the metrics, and return it."""
    loaded = len(set(new.required) - set(old.required if old else ()))
    change = StateChange(old.token if old else None, new.token, noticed_at, swapped_at, loaded, reads)
    metrics.state_apply.observe(change.seconds)
    log.info(
        "registry state %s → %s serving %.2f s after it was noticed "
        "(%d adapters newly required, loaded before the swap; %d read%s)",
        change.from_token, change.to_token, change.seconds, loaded, reads, "" if reads == 1 else "s",
    )  # fmt: skip
    warn_unpinned(old, new)
    return change


def warn_unpinned(old: ServingState | None, new: ServingState) -> None:
    """Warn about experts without alias prod, served at their latest version (registered before
    `moea register` set prod); once per expert and served version."""
    for name, entry in sorted(new.experts.items()):
        if DEFAULT_ALIAS in entry.aliases or entry.serving is None:
            continue
        before = old.experts.get(name) if old is not None else None
        if (
            before is not None
            and DEFAULT_ALIAS not in before.aliases
            and before.serving is not None
            and before.serving.version == entry.serving.version
        ):
            continue
        log.warning(
            "%s has no alias prod, so model=%s is served at its latest version (%s); pin it with "
            "`moea registry promote %s` (registering its next version pins it to %s automatically)",
            name, name, entry.serving.ref, entry.serving.ref, entry.serving.ref,
        )  # fmt: skip
