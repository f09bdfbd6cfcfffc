"""`moea serve --log-content`: the real gateway (uvicorn, real HTTP, the real `openai` client, a real SQLite
registry, the real spool and request-log writer) stores each request's client messages and the answer text
the client saw, streamed or not, and `moea feedback export` turns the rated answers of an A/B test into
preference pairs. The engine is the FAKE vLLM of fake_vllm.py (what is under test is the gateway's log).
Without the flag no content is stored."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import httpx
import openai
import pytest
from click.testing import CliRunner

from moe_adapters.feedback_export import DUPLICATE
from moe_adapters.preferences import read_preferences
from registry.service import Registry
from registry.views import RequestRecord
from serving.cli_root import moea
from serving.request_log import RequestLogWriter
from serving.request_spool import MAX_LINE_BYTES, decode, encode

from .conftest import GatewayThread, wait_for_experiment
from .fake_vllm import fake_vllm
from .registry_fixtures import make_run_dir

BASE = "fake-base"
PROMPT = [
    {"role": "system", "content": "You summarize."},
    {"role": "user", "content": "Summarize: it rained."},
]


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[object]:
    """Start a gateway (log_content on or off) in front of the fake engine; yields a starter."""
    from serving.app import create_app
    from serving.engine import EnginePool
    from serving.gateway import Gateway
    from serving.metrics import GatewayMetrics
    from serving.settings import GatewayConfig

    registry = Registry(f"sqlite:///{tmp_path / 'registry.db'}", tmp_path / "store")
    for seed in (1, 2):
        registry.register_run(make_run_dir(tmp_path, ["summarize"], seed))
    engine = GatewayThread(fake_vllm(BASE))
    threads: list[GatewayThread] = []

    def start(log_content: bool) -> tuple[GatewayThread, Registry]:
        metrics = GatewayMetrics()
        gateway = Gateway(
            GatewayConfig(
                base_name=BASE, poll_interval_s=0.2, base_lora_guard=False, log_content=log_content
            ),
            registry,
            EnginePool(httpx.AsyncClient(), urls=(engine.url,), capacity=4, metrics=metrics),
            request_log=RequestLogWriter(registry, flush_interval_s=0.2, metrics_registry=metrics.registry),
            metrics=metrics,
        )
        threads.append(GatewayThread(create_app(gateway)))
        return threads[-1], registry

    try:
        yield start
    finally:
        for thread in threads:
            thread.stop()
        engine.stop()
        registry.close()


def chat(url: str, user: str, stream: bool) -> tuple[str, str]:
    """(response id to rate, answer text as the client assembled it) of one request for `summarize`."""
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    if not stream:
        answer = client.chat.completions.create(model="summarize", messages=PROMPT, user=user)  # type: ignore[arg-type]
        return answer.id, answer.choices[0].message.content or ""
    raw = client.chat.completions.with_raw_response.create(
        model="summarize", messages=PROMPT, user=user, stream=True
    )  # type: ignore[arg-type]
    text = "".join(chunk.choices[0].delta.content or "" for chunk in raw.parse() if chunk.choices)
    return raw.headers["x-request-id"], text


def test_content_of_plain_and_streamed_answers_is_logged_and_exported_as_pairs(serve, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    gateway, registry = serve(log_content=True)
    experiment = registry.start_experiment("summarize", [(1, 50), (2, 50)], metric="thumbs")
    wait_for_experiment(gateway.url, "summarize", experiment.id)
    seen: dict[str, str] = {}
    for index in range(16):
        request_id, text = chat(gateway.url, f"user-{index}", stream=index % 2 == 1)
        seen[request_id] = text
        thumbs = "up" if text.endswith("summarize@2") else "down"  # users prefer the second arm's answer
        feedback = httpx.post(
            f"{gateway.url}/v1/feedback", json={"id": request_id, "thumbs": thumbs}, timeout=10
        )
        assert feedback.status_code == 200, feedback.text
    gateway.stop()  # drains the request log

    answers = {a.request_id: a for a in registry.logged_answers("summarize", experiment.id)}
    assert set(answers) == set(seen)  # streams the client read to the end are answers (200), not 499s
    for request_id, text in seen.items():
        assert (answers[request_id].messages, answers[request_id].answer) == (PROMPT, text)
    assert {text for text in seen.values()} == {"hello from summarize@1", "hello from summarize@2"}

    out = tmp_path / "prefs.jsonl"
    args = ["feedback", "export", "summarize", "--out", str(out), "--experiment", str(experiment.id)]
    result = CliRunner().invoke(
        moea, [*args, "--registry-url", registry.url, "--store-dir", str(tmp_path / "store")]
    )
    assert result.exit_code == 0, result.output
    pairs = read_preferences(out)
    assert [(p.client_messages(), p.chosen, p.rejected) for p in pairs] == [
        (PROMPT, "hello from summarize@2", "hello from summarize@1")
    ]  # every up/down combination has these texts: one pair, the rest are duplicates
    assert pairs[0].meta["versions"] == [2, 1] and pairs[0].meta["experiment_id"] == experiment.id
    assert (
        f"16 rated answer(s) of summarize: 2 in pairs, 14 dropped\n  dropped, {DUPLICATE}: 14"
        in result.output
    )


def test_without_the_flag_no_content_is_stored(serve) -> None:  # type: ignore[no-untyped-def]
    gateway, registry = serve(log_content=False)
    ids = [chat(gateway.url, f"user-{index}", stream=index % 2 == 1)[0] for index in range(4)]
    gateway.stop()
    with registry.engine.connect() as connection:
        logged = {row[0] for row in connection.exec_driver_sql("SELECT request_id FROM requests")}
    assert logged == set(ids) and registry.count_content() == 0


def _record(**content: object) -> RequestRecord:
    return RequestRecord(
        "chatcmpl-1", datetime.now(UTC), "summarize", 1, None, "u", False, 1.0, 1, 1, 200, **content
    )  # type: ignore[arg-type]


def test_spool_lines_carry_content_only_when_logged() -> None:
    plain = _record()
    assert b'"messages"' not in encode("request", plain) and b'"answer"' not in encode("request", plain)
    assert decode(encode("request", plain).rstrip(b"\n")) == ("request", plain)
    with_content = _record(messages=PROMPT, answer="It rained.")
    assert decode(encode("request", with_content).rstrip(b"\n")) == ("request", with_content)


def test_content_too_long_for_a_spool_line_is_dropped_and_the_request_kept(
    registry_url: str, tmp_path: Path
) -> None:
    registry = Registry(registry_url, tmp_path / "store")
    writer = RequestLogWriter(registry, tmp_path / "spool")
    huge = _record(messages=PROMPT, answer="x" * MAX_LINE_BYTES)
    fits = replace(huge, request_id="chatcmpl-2", answer="short")
    assert writer.submit_request(huge) and writer.submit_request(fits)
    stats = writer.close()
    assert stats.dropped == {"content:too_large": 1} and stats.written == {"request": 2}
    with registry.engine.connect() as connection:
        assert connection.exec_driver_sql("SELECT COUNT(*) FROM requests").scalar_one() == 2
        content = connection.exec_driver_sql("SELECT request_id, answer FROM request_content").all()
    assert [tuple(row) for row in content] == [("chatcmpl-2", "short")]
    assert Counter(stats.written) == Counter({"request": 2})
    registry.close()
