"""Prometheus metrics of the gateway (served on GET /metrics).

Every gateway owns its own :class:`prometheus_client.CollectorRegistry`, so several gateways in one
process (tests, benchmarks) never collide. Label conventions:

- ``expert``: the vLLM adapter that answered, ``name@version``, or ``base``;
- ``experiment``: the running A/B experiment's id, or ``""`` outside experiments — together with
  ``expert`` this gives the per-arm series;
- ``endpoint``: ``chat`` or ``completions``.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
STATE_APPLY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0)
OVERHEAD_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.1)


class GatewayMetrics:
    """The gateway's counters, histograms and gauges, registered in a private registry."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:  # long: one flat declaration per metric, easier to scan than split up
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "moea_requests",
            "Completed generation requests.",
            ["endpoint", "expert", "experiment", "status"],
            registry=r,
        )
        self.errors = Counter(
            "moea_request_errors",
            "Requests answered with an error, by OpenAI error type.",
            ["endpoint", "type"],
            registry=r,
        )
        self.latency = Histogram(
            "moea_request_latency_seconds",
            "End-to-end latency of generation requests (to the last byte for streams).",
            ["endpoint", "expert", "experiment"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.overhead = Histogram(
            "moea_gateway_overhead_seconds",
            "Time spent in the gateway before forwarding (parse, validate, route, pick engine).",
            ["endpoint"],
            buckets=OVERHEAD_BUCKETS,
            registry=r,
        )
        self.tokens = Counter(
            "moea_tokens", "Prompt and completion tokens.", ["expert", "experiment", "kind"], registry=r
        )
        self.router_decisions = Counter(
            "moea_router_decisions",
            "Router decisions by label (`abstain` when below threshold).",
            ["label"],
            registry=r,
        )
        self.router_abstains = Counter(
            "moea_router_abstains", "Router abstentions (request sent to base).", registry=r
        )
        self.router_batch = Histogram(
            "moea_router_batch_size",
            "Prompts per router forward pass.",
            buckets=(1, 2, 4, 8, 16, 32, 64),
            registry=r,
        )
        self.loaded_adapters = Gauge(
            "moea_loaded_adapters", "LoRA adapters loaded in each engine replica.", ["replica"], registry=r
        )
        self.adapter_operations = Counter(
            "moea_adapter_operations",
            "LoRA loads/unloads sent to engines.",
            ["operation", "outcome"],
            registry=r,
        )
        self.engine_healthy = Gauge(
            "moea_engine_healthy", "1 when the replica is serving.", ["replica"], registry=r
        )
        self.engine_requests = Counter(
            "moea_engine_requests",
            "Requests sent to each engine replica (a request sent again after a failure counts again).",
            ["replica"],
            registry=r,
        )
        self.engine_retries = Counter(
            "moea_engine_retries",
            "Requests sent again to a healthy replica after this one failed them before anything reached the "
            "client: its connection broke (`broken`; it leaves the rotation) or it had forgotten the adapter.",
            ["replica", "reason"],
            registry=r,
        )
        self.engine_restarts = Counter(
            "moea_engine_restarts", "Engine processes restarted.", ["replica"], registry=r
        )
        self.state_refreshes = Counter(
            "moea_state_refreshes", "Registry state reloads by outcome.", ["outcome"], registry=r
        )
        self.state_apply = Histogram(
            "moea_state_apply_seconds",
            "Registry state changes: seconds from the gateway noticing one to serving it (every adapter the "
            "new state needs loaded first, then the snapshot swapped).",
            buckets=STATE_APPLY_BUCKETS,
            registry=r,
        )
        self.feedback = Counter("moea_feedback", "Feedback records accepted.", ["kind"], registry=r)
        self.guardrail_breached = Gauge(
            "moea_guardrail_breached",
            "1 once a guardrail of the experiment was breached and the experiment stopped (alert on it).",
            ["expert", "experiment", "guardrail"],
            registry=r,
        )
        self.guardrail_checks = Counter(
            "moea_guardrail_checks",
            "Guardrail evaluations by outcome (ok, breached, waiting for data, error).",
            ["outcome"],
            registry=r,
        )
        self.golden_checks = Counter(
            "moea_golden_checks",
            "Golden-prompt checks of newly loaded adapters by outcome (passed, failed, skipped: no recorded answers).",
            ["outcome"],
            registry=r,
        )
        self.golden_failed = Gauge(
            "moea_golden_check_failed",
            "1 when an adapter failed its golden-prompt check: it holds back a registry state, or (checked at start) serves anyway.",
            ["adapter"],
            registry=r,
        )
        self.treatment_share = Gauge(
            "moea_experiment_treatment_share",
            "Percent of an experiment's traffic sent to its treatment arms (follows the ramp; 0 once stopped).",
            ["expert", "experiment"],
            registry=r,
        )

    def observe_response(
        self,
        endpoint: str,
        expert: str,
        experiment: str,
        status: int,
        seconds: float,
        prompt_tokens: int,
        completion_tokens: int,
    ) -> None:
        """Record one finished generation request."""
        self.requests.labels(endpoint, expert, experiment, str(status)).inc()
        self.latency.labels(endpoint, expert, experiment).observe(seconds)
        if prompt_tokens:
            self.tokens.labels(expert, experiment, "prompt").inc(prompt_tokens)
        if completion_tokens:
            self.tokens.labels(expert, experiment, "completion").inc(completion_tokens)

    def observe_route(self, label: str | None) -> None:
        """Record one router decision (None = abstain)."""
        self.router_decisions.labels(label or "abstain").inc()
        if label is None:
            self.router_abstains.inc()

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)
