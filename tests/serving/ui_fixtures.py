"""Registry content and a gateway for the dashboard tests (tests/serving/test_ui.py) and its benchmark
(benchmarks/bench_ui.py): everything is written through the real registry API into a real SQLite file.
The gateway's engine URL points at a closed port (no engine is started: the pages read the registry and
the gateway's own state; the Engines page then shows the replica as down)."""

from __future__ import annotations

import random
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx

from registry.local import free_port
from registry.service import Registry
from registry.views import OutcomeRecord, RequestRecord

from .registry_fixtures import make_run_dir

BASE = "SmolLM2-135M-Instruct"
OPS, READER, APP = "ops-ui-secret-41f0", "reader-ui-secret-9a2c", "app-ui-secret-77d1"
KEYS = (f"ops:{OPS}:admin", f"reader:{READER}:read", f"app:{APP}:chat,feedback")
EXPERIMENT_EXPERT = "expert-000"


@dataclass
class Filled:
    """What :func:`fill_registry` wrote."""

    experts: list[str]
    experiment_id: int
    requests: int


def fill_registry(registry: Registry, root: Path, experts: int, requests: int, seed: int = 0) -> Filled:
    """`experts` experts with versions 1 and 2 (two registered runs; prod at 1, a canary alias at 2 on
    every other expert, and a rollback-able move on the first), an experiment 1:50,2:50 on the first
    expert, and `requests` logged requests (half in the experiment, with rewards on every third), the rest
    routed or named, spread over the last 10 minutes."""
    names = [f"expert-{i:03d}" for i in range(experts)]
    registry.register_run(make_run_dir(root, names, seed=seed + 1), actor="ci")
    registry.register_run(make_run_dir(root, names, seed=seed + 2), actor="ci")
    for index, name in enumerate(names):
        if index % 2 == 0:
            registry.promote(f"{name}@2", "canary", actor="ci", reason="try v2")
    registry.promote(f"{EXPERIMENT_EXPERT}@2", actor="ci", reason="first move")
    registry.promote(f"{EXPERIMENT_EXPERT}@1", actor="ci", reason="back for the experiment")
    experiment = registry.start_experiment(
        EXPERIMENT_EXPERT, [(1, 0.5), (2, 0.5)], metric="reward", actor="ci"
    )
    log_requests(registry, names, experiment.id, requests, seed)
    return Filled(names, experiment.id, requests)


def log_requests(registry: Registry, names: list[str], experiment_id: int, n: int, seed: int) -> None:
    """`n` request records (and outcomes for every third experiment request) through the registry API."""
    rng = random.Random(seed)
    now = datetime.now(UTC)
    records, outcomes = [], []
    for i in range(n):
        created = now - timedelta(seconds=rng.uniform(1, 600))
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        if i % 2 == 0:
            version = 1 + (i // 2) % 2
            record = RequestRecord(request_id, created, EXPERIMENT_EXPERT, version, experiment_id,
                                   f"user-{rng.randrange(200)}", False, rng.uniform(20, 80), 12, 8, 200,
                                   key_name="app")  # fmt: skip
            if i % 3 == 0:
                outcomes.append(OutcomeRecord(request_id, created, reward=rng.random() + 0.1 * version))
        else:
            routed_to = None if i % 7 == 0 else rng.choice(names)
            record = RequestRecord(request_id, created, routed_to, 1 if routed_to else None, None, None,
                                   True, rng.uniform(20, 80), 10, 6, 200, key_name="app")  # fmt: skip
        records.append(record)
    for start in range(0, len(records), 2000):
        registry.log_requests(records[start : start + 2000])
    registry.record_outcomes(outcomes)


def make_gateway(registry: Registry, keys: tuple[str, ...] = KEYS) -> Any:
    """A gateway over `registry` (not started: no engine, no watcher) whose serving state is read now."""
    from serving.engine import EnginePool
    from serving.gateway import Gateway
    from serving.metrics import GatewayMetrics
    from serving.settings import GatewayConfig
    from serving.state import load_state

    metrics = GatewayMetrics()
    pool = EnginePool(httpx.AsyncClient(), urls=(f"http://127.0.0.1:{free_port()}",), metrics=metrics)
    config = GatewayConfig(base_name=BASE, api_keys=keys, base_lora_guard=False)
    gateway = Gateway(config, registry, pool, metrics=metrics)
    gateway.state = load_state(registry)
    return gateway


def bearer(secret: str) -> dict[str, str]:
    """The Authorization header of a key."""
    return {"Authorization": f"Bearer {secret}"}
