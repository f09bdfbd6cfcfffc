"""The gateway's guardrail monitor: checks running experiments' guardrails and advances their ramps.

Every ``interval_s`` seconds, in a thread off the event loop, the monitor reads each running experiment
that has guardrails or a ramp *from the registry* (the request log and outcomes every gateway writes),
not from this gateway's own counters: all replicas then judge the same data and agree, and a gateway
that restarts loses nothing. On a sequentially significant breach (:mod:`serving.ab.guardrails`) it
calls ``registry.guardrail_stop``: the experiment stops, alias prod points at the control arm and the
alias history records the reason; the transaction re-checks that the experiment still runs, so when
several gateways see the breach at once exactly one stops it. ``moea_guardrail_breached{expert,
experiment,guardrail}`` is then set to 1 on every gateway that saw the experiment running (the one that
stopped it, and the others on their next check, from the stop reason). A ramp step advances through
``registry.advance_ramp``, a compare-and-set on the step, so it advances once however many gateways run.
Registry errors are logged and counted (``moea_guardrail_checks{outcome="error"}``); serving goes on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

from .ab.assign import ABError
from .ab.guardrails import (
    Guardrail,
    breach_reason,
    breached_guardrail,
    check_guardrails,
    parse_guardrail,
    ramp_due,
    treatment_share,
)
from .metrics import GatewayMetrics

log = logging.getLogger("moea.serving.guardrails")

DEFAULT_INTERVAL_S = 15.0
"""How often a gateway checks guardrails and ramps (each check reads the experiment's request log)."""

ACTOR = "moea-guardrails"
"""Who guardrail stops are recorded as, in the experiment and the alias history."""


class GuardMonitor:
    """Periodic guardrail and ramp checks of one gateway (start/close with the gateway)."""

    def __init__(
        self,
        registry: Any,
        metrics: GatewayMetrics,
        *,
        interval_s: float = DEFAULT_INTERVAL_S,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.registry = registry
        self.metrics = metrics
        self.interval_s = interval_s
        self.clock = clock
        self._watched: dict[int, str] = {}
        """Running experiments with guardrails seen at the last check → expert."""
        self._bad_specs: set[tuple[int, str]] = set()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Start the periodic checks (call from the event loop)."""
        self._task = asyncio.create_task(self._loop(), name="moea-guardrail-monitor")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await asyncio.to_thread(self.check_once)
            except Exception:  # a flaky database must not end the monitor; the next check tries again
                self.metrics.guardrail_checks.labels("error").inc()
                log.exception("guardrail check failed; retrying in %.0f s", self.interval_s)

    def check_once(self) -> list[str]:
        """One pass over the running experiments; returns what it did (one line per action)."""
        running = self.registry.active_experiments()
        running_ids = {experiment.id for experiment in running}
        for experiment_id in [i for i in self._watched if i not in running_ids]:
            self._watched.pop(experiment_id)
            stopped = self.registry.get_experiment(experiment_id)
            rail = breached_guardrail(stopped.stop_reason)
            if rail is not None:  # stopped by a guardrail (here or by another gateway): raise the alert
                self._alert(stopped.expert, experiment_id, rail)
        actions = []
        for experiment in running:
            if experiment.guardrails or experiment.ramp:
                action = self._check(experiment)
                if action:
                    actions.append(action)
        return actions

    def _check(self, experiment: Any) -> str | None:
        self.metrics.treatment_share.labels(experiment.expert, str(experiment.id)).set(
            treatment_share(experiment)
        )
        requests = self.registry.experiment_requests(experiment.id)
        rails = self._rails(experiment)
        needs_outcomes = any(rail.metric in ("thumbs", "reward") for rail in rails)
        outcomes = self.registry.experiment_outcomes(experiment.id) if needs_outcomes else []
        specs = [rail.text for rail in rails]
        checks = check_guardrails(replace(experiment, guardrails=specs), requests, outcomes) if rails else []
        if rails:
            self._watched[experiment.id] = experiment.expert
        for check in checks:
            self.metrics.guardrail_checks.labels(check.status).inc()
        breach = next((check for check in checks if check.breached), None)
        if breach is not None:
            reason = breach_reason(experiment, breach)
            stopped = self.registry.guardrail_stop(experiment.id, reason, actor=ACTOR)
            self._alert(experiment.expert, experiment.id, breach.guardrail.text)
            self._watched.pop(experiment.id, None)
            self.metrics.treatment_share.labels(experiment.expert, str(experiment.id)).set(0.0)
            log.warning("%s", reason)
            return reason if stopped is not None else None
        if ramp_due(experiment, requests, self.clock()):
            advanced = self.registry.advance_ramp(experiment.id, experiment.ramp_step)
            if advanced is not None:
                share = treatment_share(advanced)
                self.metrics.treatment_share.labels(experiment.expert, str(experiment.id)).set(share)
                message = (
                    f"experiment {experiment.id} on {experiment.expert}: guardrails hold, ramp step "
                    f"{advanced.ramp_step + 1}/{len(advanced.ramp)}, treatment share now {share:g}%"
                )
                log.info("%s", message)
                return message
        return None

    def _rails(self, experiment: Any) -> list[Guardrail]:
        """The experiment's guardrails that parse (a bad stored spec is logged once and skipped)."""
        good = []
        for spec in experiment.guardrails:
            try:
                good.append(parse_guardrail(spec))
            except ABError as error:
                if (experiment.id, spec) not in self._bad_specs:
                    self._bad_specs.add((experiment.id, spec))
                    log.error("experiment %s: skipping guardrail: %s", experiment.id, error)
        return good

    def _alert(self, expert: str, experiment_id: int, guardrail: str) -> None:
        self.metrics.guardrail_breached.labels(expert, str(experiment_id), guardrail).set(1)
