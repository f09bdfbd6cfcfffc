"""The gateway's state refresh reads what it serves, not the registry's history (serving/state.py).

A refresh (:func:`serving.state.load_state`, after every registry change) builds a view for the versions
the snapshot serves without a number (alias holders, the newest live version, experiment arms and
shadows) only; an old version asked for by number (`NAME@5`) is read from the registry on request
(:func:`serving.state.pinned_version`) and remembered with the state it was read under. The views are
counted where the registry builds them, not timed (benchmarks/bench_registry_scale.py times them).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from registry import versions
from registry.service import Registry

from .conftest import GatewayThread
from .fake_vllm import fake_vllm
from .registry_fixtures import make_run_dir

BASE = "fake-base"
EXPERTS = ["summarize", "classify"]
RUNS = 13


@pytest.fixture
def registry(registry_url: str, tmp_path: Path) -> Iterator[Registry]:
    """13 versions of `summarize` (prod 2, canary 1) and `classify` (prod 1; experiment: arms 1 and 3,
    shadow 2)."""
    with Registry(registry_url, tmp_path / "store") as reg:
        for seed in range(1, RUNS + 1):
            reg.register_run(make_run_dir(tmp_path, EXPERTS, seed))
        reg.promote("summarize@2")
        reg.promote("summarize@1", "canary")
        reg.start_experiment("classify", [(1, 50), (3, 50)], shadow_version=2)
        yield reg


@pytest.fixture
def views_built(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The refs of the ExpertVersionViews the registry builds from now on (make_version_view builds them)."""
    built: list[str] = []
    real = versions.ExpertVersionView

    def counting(**fields: Any) -> Any:
        view = real(**fields)
        built.append(view.ref)
        return view

    monkeypatch.setattr(versions, "ExpertVersionView", counting)
    return built


class CountingResolves:
    """The real registry, counting its `resolve` calls (the gateway's reads of pinned versions)."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self.resolves: list[str] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.registry, name)

    def resolve(self, ref: str, include_archived: bool = False) -> Any:
        self.resolves.append(ref)
        return self.registry.resolve(ref, include_archived)


def test_a_refresh_builds_views_of_the_served_versions_only(
    registry: Registry, views_built: list[str]
) -> None:
    from serving.state import load_state

    state = load_state(registry)
    served = {"summarize@1", "summarize@2", f"summarize@{RUNS}", "classify@1", "classify@2", "classify@3",
              f"classify@{RUNS}"}  # fmt: skip
    assert sorted(views_built) == sorted(served)  # each once; before: all 26 versions and one resolve each
    summarize, classify = state.experts["summarize"], state.experts["classify"]
    assert sorted(summarize.versions) == [1, 2, RUNS] and sorted(classify.versions) == [1, 2, 3, RUNS]
    assert (summarize.serving.version, summarize.aliases, summarize.latest) == (
        2,
        {"canary": 1, "prod": 2},
        RUNS,
    )
    assert (classify.serving.version, classify.aliases, classify.latest) == (1, {"prod": 1}, RUNS)
    assert set(state.required) == {"summarize@2", "classify@1", "classify@3", "classify@2"}
    for entry in state.experts.values():
        assert entry.serving == registry.resolve(entry.name)
        for number, view in entry.versions.items():
            assert view == registry.resolve(f"{entry.name}@{number}", include_archived=True)


def test_a_pinned_version_outside_the_snapshot_is_read_once_per_state(registry: Registry) -> None:
    from serving.errors import APIError
    from serving.state import load_state

    from .ui_fixtures import make_gateway

    counted = CountingResolves(registry)
    gateway = make_gateway(counted)  # type: ignore[arg-type]
    state = gateway.state

    def resolve(model: str) -> Any:
        return asyncio.run(gateway.resolve(model, None))

    def refused(model: str) -> str:
        with pytest.raises(APIError) as caught:
            resolve(model)
        assert (caught.value.status, caught.value.code) == (404, "model_not_found")
        return str(caught.value.message)

    target = resolve("summarize@5")
    assert (target.adapter, target.expert, target.version, target.path) == (
        "summarize@5",
        "summarize",
        5,
        None,
    )
    assert target.view == registry.resolve("summarize@5")
    assert asyncio.run(gateway.adapter_path(target)) == str(registry.artifact_path(target.view))
    assert resolve("summarize@5").view == target.view and counted.resolves == ["summarize@5"]  # remembered
    assert resolve("summarize@2").view == state.experts["summarize"].versions[2]  # in the snapshot: no read
    assert counted.resolves == ["summarize@5"]

    # Neither an unknown version nor (after the registry moved on) an archived one is servable; the message
    # names the newest version and the aliases, not all 13 versions.
    unknown = refused("summarize@99")
    assert unknown.endswith(f"(latest version: {RUNS}, aliases: {{'canary': 1, 'prod': 2}})"), unknown
    assert "summarize@99" in state.pinned and len(counted.resolves) == 2
    refused("summarize@99999999999999999999")  # more than a version can be: no read at all
    assert len(counted.resolves) == 2

    registry.archive("summarize@5")
    registry.archive("summarize@6")
    assert "summarize@6 is archived" in refused("summarize@6")  # read after the registry moved on...
    assert "summarize@6" not in state.pinned  # ...so it is this request's answer, not the state's
    assert resolve("summarize@5").version == 5  # the state's own answer, read under its token

    gateway.state = load_state(counted)
    assert "summarize@5 is archived" in refused("summarize@5")  # the new state reads it again
    assert gateway.state.pinned == {"summarize@5": registry.resolve("summarize@5", include_archived=True)}


@pytest.fixture
def served(registry: Registry) -> Iterator[tuple[str, Any]]:
    """A started gateway in front of the fake engine (fake_vllm.py, not vLLM); (its URL, the gateway)."""
    from serving.app import create_app
    from serving.engine import EnginePool
    from serving.gateway import Gateway
    from serving.settings import GatewayConfig

    engine = GatewayThread(fake_vllm(BASE))
    config = GatewayConfig(base_name=BASE, poll_interval_s=0.1, base_lora_guard=False)
    gateway = Gateway(config, registry, EnginePool(httpx.AsyncClient(), urls=(engine.url,), capacity=16))
    thread = GatewayThread(create_app(gateway))
    try:
        yield thread.url, gateway
    finally:
        thread.stop()
        engine.stop()


def test_an_old_pinned_version_is_loaded_and_answers_through_the_gateway(
    served: tuple[str, Any], registry: Registry
) -> None:
    url, gateway = served
    assert 4 not in gateway.state.experts["summarize"].versions
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    raw = client.chat.completions.with_raw_response.create(
        model="summarize@4", messages=[{"role": "user", "content": "hi"}]
    )
    assert raw.headers["x-moea-expert"] == "summarize@4"
    assert raw.parse().choices[0].message.content == "hello from summarize@4"  # loaded on demand

    registry.archive("summarize@4")
    token = registry.state_token()
    deadline = time.monotonic() + 30
    while gateway.state.token != token:  # the old state would still serve it: it was read under its token
        assert time.monotonic() < deadline, "the gateway did not pick up the archive"
        time.sleep(0.05)
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(model="summarize@4", messages=[{"role": "user", "content": "hi"}])
    assert caught.value.body["code"] == "model_not_found"  # type: ignore[index]
    assert "summarize@4 is archived" in caught.value.body["message"]  # type: ignore[index]
