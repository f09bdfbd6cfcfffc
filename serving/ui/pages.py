"""View models of the dashboard's pages: plain dicts built from the registry (serving/ui/queries.py), the
A/B analysis (serving/ab/report.py) and the gateway's own state and counters. Templates only format.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Any

from ..ab.report import ABReport, compute_report
from ..gateway import Gateway
from . import queries

RECENT_REQUESTS = 50
"""Rows of the Routing page's recent-requests table."""
CONFIDENCE_BINS = 10
SERIES_POINTS = 40
"""Points per arm in an experiment's chart over time."""


def experts_page(gateway: Gateway) -> dict[str, Any]:
    """Every expert: versions (metrics, eval scores, size, created, parent), aliases, alias history, and
    the version the gateway serves now for `model=NAME`."""
    catalog = queries.expert_catalog(gateway.registry.engine)
    state = gateway.state
    experts = []
    for name, description, task_kind in catalog.experts:
        entry = state.experts.get(name) if state is not None else None
        serving = entry.serving.version if entry is not None and entry.serving is not None else None
        versions = [
            {
                "version": v.version,
                "ref": v.ref,
                "created_at": v.created_at,
                "created_by": v.created_by,
                "size": v.size,
                "parent": v.parent_version,
                "archived": v.archived,
                "aliases": v.aliases,
                "eval_score": _eval_score(v.metrics),
                "metrics": _flat_metrics(v.metrics),
                "golden": catalog.scores.get((name, v.version), []),
                "sha256": v.sha256,
            }
            for v in catalog.versions.get(name, [])
        ]
        experts.append(
            {
                "name": name,
                "description": description,
                "task_kind": task_kind,
                "versions": versions,
                "latest": versions[-1]["version"] if versions else None,
                "aliases": catalog.aliases.get(name, []),
                "history": list(reversed(catalog.history.get(name, []))),
                "serving": serving,
            }
        )
    return {"experts": experts, "state_token": state.token if state is not None else None}


def _eval_score(metrics: dict[str, Any]) -> str:
    score = metrics.get("eval_score")
    if isinstance(score, dict) and isinstance(score.get("score"), int | float):
        return f"{score.get('metric')} {score['score']:.3f} (n={score.get('n')})"
    return ""


def _flat_metrics(metrics: dict[str, Any], limit: int = 6) -> list[tuple[str, str]]:
    """The first scalar metrics, `a.b` for nested dicts (the full set is in `moea registry show`)."""
    flat: list[tuple[str, str]] = []

    def walk(prefix: str, value: Any) -> None:
        if len(flat) >= limit:
            return
        if isinstance(value, dict):
            for key in sorted(value):
                if key != "eval_score":
                    walk(f"{prefix}.{key}" if prefix else str(key), value[key])
        elif isinstance(value, bool | int | float) and not isinstance(value, bool):
            flat.append((prefix, f"{value:.4g}"))

    walk("", metrics)
    return flat


def routing_page(gateway: Gateway, minutes: float) -> dict[str, Any]:
    """Router version, labels, threshold; routing decisions and confidences over the last `minutes`; the
    share of routed requests sent to base; recent requests with the expert that answered (and what was said,
    only where `moea serve --log-content` stored it)."""
    now = datetime.now(UTC)
    since = now - timedelta(minutes=minutes)
    counts = queries.route_counts(gateway.registry.engine, since)
    routed = Counter[str]()
    by_target = Counter[str]()
    for row in counts:
        label = f"{row.expert}@{row.version}" if row.expert else "base"
        by_target[label] += row.requests
        if row.routed:
            routed[row.expert or "base"] += row.requests
    routed_total = sum(routed.values())
    loaded = gateway.router.current
    confidences = _confidences(gateway, since.timestamp())
    return {
        "minutes": minutes,
        "router": {
            "ref": gateway.router.ref,
            "labels": list(loaded.labels) if loaded is not None else [],
            "threshold": loaded.router.threshold if loaded is not None else None,
            "encoder": loaded.router.meta.get("encoder") if loaded is not None else None,
        },
        "decisions": _bars(routed),
        "targets": _bars(by_target),
        "routed_total": routed_total,
        "base_share": routed["base"] / routed_total if routed_total else None,
        "confidences": confidences,
        "recent": queries.recent_requests(gateway.registry.engine, RECENT_REQUESTS),
    }


def _bars(counter: Counter[str]) -> list[dict[str, Any]]:
    """Histogram rows (label, count, share of the largest for the bar width), largest first."""
    top = max(counter.values(), default=0)
    return [
        {"label": label, "count": count, "width": count / top if top else 0.0}
        for label, count in sorted(counter.items(), key=lambda item: (-item[1], item[0]))
    ]


def _confidences(gateway: Gateway, since: float) -> dict[str, Any]:
    """Histogram of the router's top-class confidence over its recent decisions (kept in memory)."""
    bins = [0] * CONFIDENCE_BINS
    abstains = total = 0
    for when, label, confidence in list(gateway.router.recent):
        if when < since:
            continue
        total += 1
        abstains += label is None
        bins[min(CONFIDENCE_BINS - 1, max(0, int(confidence * CONFIDENCE_BINS)))] += 1
    top = max(bins) or 1
    return {
        "total": total,
        "abstains": abstains,
        "bins": [
            {"low": i / CONFIDENCE_BINS, "high": (i + 1) / CONFIDENCE_BINS, "count": n, "width": n / top}
            for i, n in enumerate(bins)
        ],
    }


def experiments_page(gateway: Gateway) -> dict[str, Any]:
    """Every experiment, running first, newest first: its report as the table rows show it."""
    experiments = {e.id: e for e in gateway.registry.list_experiments()}
    requests, outcomes = queries.experiments_data(gateway.registry.engine, list(experiments))
    rows = []
    for experiment in sorted(experiments.values(), key=lambda e: (e.status != "running", -e.id)):
        report = compute_report(experiment, requests[experiment.id], outcomes[experiment.id])
        rows.append({"experiment": experiment, "report": report_summary(report)})
    return {"experiments": rows}


def report_summary(report: ABReport) -> dict[str, Any]:
    """What the page and its JSON endpoint show of a report (JSON-ready: NaN as None)."""
    comparisons = {
        c.treatment: {
            "p_value": _number(c.p_value),
            "interval": [_number(x) for x in c.interval],
            "significant": c.significant,
        }
        for c in report.comparisons
    }
    return {
        "id": report.experiment_id,
        "expert": report.expert,
        "metric": report.metric,
        "status": report.status,
        "unit": report.unit,
        "verdict": report.verdict,
        "recommendation": {"decision": report.recommendation.decision, "text": report.recommendation.text},
        "srm": {
            "p_value": _number(report.srm.p_value),
            "chi2": _number(report.srm.chi2),
            "flagged": report.srm.flagged,
            "observed": report.srm.observed,
        },
        "arms": [
            {
                "version": arm.version,
                "ref": arm.ref,
                "weight": arm.weight,
                "requests": arm.requests,
                "users": arm.users,
                "errors": arm.errors,
                "mean": _number(arm.metric.mean),
                "low": _number(arm.metric.low),
                "high": _number(arm.metric.high),
                "outcomes": arm.metric.n,
                "p50_ms": _number(arm.latency_p50_ms),
                "p95_ms": _number(arm.latency_p95_ms),
                "comparison": comparisons.get(arm.version),
            }
            for arm in report.arms
        ],
        "notes": report.notes,
    }


def _number(value: float) -> float | None:
    return None if value is None or not math.isfinite(value) else round(float(value), 6)


def experiment_series(gateway: Gateway, experiment_id: int) -> dict[str, Any] | None:
    """An experiment's report plus, per arm, cumulative requests and outcome mean over time (the chart)."""
    experiments = [e for e in gateway.registry.list_experiments() if e.id == experiment_id]
    if not experiments:
        return None
    experiment = experiments[0]
    requests, outcomes = queries.experiments_data(gateway.registry.engine, [experiment_id])
    report = compute_report(experiment, requests[experiment_id], outcomes[experiment_id])
    logged = requests[experiment_id]
    start = experiment.started_at.timestamp()
    end = (experiment.stopped_at or datetime.now(UTC)).timestamp()
    step = max(1e-3, (end - start) / SERIES_POINTS)
    times = [start + step * (i + 1) for i in range(SERIES_POINTS)]
    reward_of = _outcome_values(outcomes[experiment_id], experiment.metric)
    series = []
    for arm in experiment.arms:
        points: list[dict[str, Any]] = []
        mine = sorted(
            (r.created_at.timestamp(), r.request_id)
            for r in logged
            if r.version == arm.version and not r.shadow
        )
        index = count = scored = 0
        total = 0.0
        for t in times:
            while index < len(mine) and mine[index][0] <= t:
                count += 1
                value = reward_of.get(mine[index][1])
                if value is not None:
                    scored, total = scored + 1, total + value
                index += 1
            points.append({"t": t, "requests": count, "mean": total / scored if scored else None})
        series.append({"version": arm.version, "points": points})
    return {"report": report_summary(report), "series": series, "generated_at": time.time()}


def _outcome_values(outcomes: list[Any], metric: str) -> dict[str, float]:
    """request id → its latest reward (or thumbs as 1/0) for the chart."""
    values: dict[str, float] = {}
    for outcome in outcomes:
        value = outcome.reward if metric == "reward" else outcome.thumbs
        if value is not None:
            values[outcome.request_id] = float(value)
    return values


def engines_page(gateway: Gateway) -> dict[str, Any]:
    """Engine replicas: health, process, loaded adapters, requests in flight, restarts (gateway counters)."""
    restarts = _samples(gateway.metrics.engine_restarts, "moea_engine_restarts_total")
    replicas = [
        {
            "name": replica.name,
            "url": replica.url,
            "healthy": replica.healthy,
            "pid": replica.process.pid if replica.process is not None else None,
            "owned": replica.process is not None,
            "adapters": sorted(replica.loaded),
            "capacity": replica.capacity,
            "inflight": replica.inflight,
            "failures": replica.failures,
            "restarts": int(restarts.get(replica.name, 0)),
        }
        for replica in gateway.pool.replicas
    ]
    state = gateway.state
    return {
        "replicas": replicas,
        "required": sorted(state.required) if state is not None else [],
        "router": gateway.router.ref,
        "state_token": state.token if state is not None else None,
        "last_change": gateway.last_change,
    }


def _samples(metric: Any, sample_name: str) -> dict[str, float]:
    """Label value (the first label) → sample value of a labelled prometheus metric."""
    values: dict[str, float] = {}
    for family in metric.collect():
        for sample in family.samples:
            if sample.name == sample_name and sample.labels:
                values[next(iter(sample.labels.values()))] = sample.value
    return values
