"""The whole product through its CLI: train → register → serve (real vLLM) → official openai client.

One module-scoped server keeps the suite inside CI's time: training a tiny mixture takes ~1 min and
vLLM starts in ~30 s on 2 CPU cores.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
import yaml

from moe_adapters.config_paths import relocate_raw_mixture
from registry.local import free_port
from serving.demo import stop_process_group, wait_until_ready

pytestmark = pytest.mark.slow

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
TASKS = ("sentiment", "math", "extraction", "dates")
ROWS_PER_TASK = 150


def _moea(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [sys.executable, "-m", "serving.cli_root", *args],
        env=env,
        text=True,
        capture_output=True,
        timeout=1200,
    )
    assert result.returncode == 0, f"moea {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
    return result


def _tiny_mixture(tmp: Path) -> tuple[Path, dict[str, list[str]]]:
    """The example mixture cut to a few rows per task; returns it and unseen prompts per task."""
    mixture = relocate_raw_mixture(yaml.safe_load((EXAMPLES / "mixture.yaml").read_text()), EXAMPLES)
    held_out: dict[str, list[str]] = {}
    for task in mixture["tasks"]:
        source = EXAMPLES / task["files"][0]
        rows = _read_rows(source)
        keep = rows[: ROWS_PER_TASK if not task.get("replay") else 24]
        target = tmp / f"{task['name']}.jsonl"
        target.write_text("".join(json.dumps(r) + "\n" for r in keep))
        task["files"] = [str(target)]
        task["prompt_field"], task["response_field"] = "prompt", "response"
        if task["name"] in TASKS:
            held_out[task["name"]] = [r["prompt"] for r in rows[-3:]]
    mixture["train"].update({"max_steps": 48, "eval_every": 6, "checkpoint_every": 0, "patience": 0})
    path = tmp / "mixture.yaml"
    path.write_text(yaml.safe_dump(mixture))
    return path, held_out


def _read_rows(path: Path) -> list[dict[str, str]]:
    if path.suffix == ".csv":
        import csv

        with path.open(newline="") as handle:
            return [dict(row) for row in csv.DictReader(handle)]
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, object]]:
    tmp = tmp_path_factory.mktemp("e2e")
    env = {
        **os.environ,
        "MOEA_REGISTRY_URL": f"sqlite:///{tmp / 'registry.db'}",
        "MOEA_STORE_DIR": str(tmp / "store"),
        "PYTHONUNBUFFERED": "1",
    }
    mixture, held_out = _tiny_mixture(tmp)
    _moea("train", str(mixture), "--out", str(tmp / "run"), env=env)
    registered = _moea("register", str(tmp / "run"), env=env)
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    log = (tmp / "serve.log").open("w")
    server = subprocess.Popen(
        [sys.executable, "-m", "serving.cli_root", "serve", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        wait_until_ready(base_url, server, timeout_s=600)
        yield {
            "base_url": base_url,
            "held_out": held_out,
            "register_output": registered.stdout,
            "server": server,
            "tmp": tmp,
            "env": env,
        }
    finally:
        stop_process_group(server)
        log.close()
        print((tmp / "serve.log").read_text()[-4000:])


@pytest.fixture(scope="module")
def client(served: dict[str, object]) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{served['base_url']}/v1", api_key="unused", max_retries=0)


def _chat(
    client: openai.OpenAI, model: str, prompt: str, max_tokens: int = 24
) -> tuple[str, str, dict[str, object]]:
    raw = client.chat.completions.with_raw_response.create(
        model=model, messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens, temperature=0.0
    )
    completion = raw.parse()
    extra = completion.model_extra or {}
    return raw.headers["x-moea-expert"], completion.choices[0].message.content or "", extra.get("moea", {})


def test_register_reports_one_version_per_expert(served: dict[str, object]) -> None:
    output = str(served["register_output"])
    for task in TASKS:
        assert f"{task}@1" in output or f"{task}" in output


def test_models_lists_moe_base_and_every_expert(client: openai.OpenAI) -> None:
    ids = {model.id for model in client.models.list().data}
    assert "moe" in ids
    assert set(TASKS) <= ids
    assert "general" not in ids  # replay data never becomes an expert


@pytest.mark.parametrize("task", TASKS)
def test_moe_routes_each_task_to_its_expert(
    client: openai.OpenAI, served: dict[str, object], task: str
) -> None:
    for prompt in served["held_out"][task]:  # type: ignore[index]
        header, _, moea_field = _chat(client, "moe", prompt)
        assert header == f"{task}@1", f"{prompt!r} went to {header}"
        assert moea_field.get("expert") == task and moea_field.get("version") == 1
        assert moea_field.get("routed") is True


def test_expert_output_differs_from_base(client: openai.OpenAI, served: dict[str, object]) -> None:
    base_id = next(m.id for m in client.models.list().data if m.id not in {"moe", *TASKS})
    differing = 0
    for task in TASKS:
        prompt = served["held_out"][task][0]  # type: ignore[index]
        expert_header, expert_text, _ = _chat(client, task, prompt)
        base_header, base_text, _ = _chat(client, base_id, prompt)
        assert expert_header == f"{task}@1" and base_header == "base"
        differing += expert_text.strip() != base_text.strip()
    assert differing >= 3, "LoRA experts should change the base model's answers"


def test_pinned_version_and_streaming(client: openai.OpenAI, served: dict[str, object]) -> None:
    prompt = served["held_out"]["dates"][0]  # type: ignore[index]
    # Same max_tokens for both: a longer answer cut at different lengths is not a streaming bug.
    header, text, _ = _chat(client, "dates@1", prompt, max_tokens=16)
    assert header == "dates@1" and text
    stream = client.chat.completions.create(
        model="dates@1",
        messages=[{"role": "user", "content": prompt}],
        max_tokens=16,
        temperature=0.0,
        stream=True,
    )
    chunks = list(stream)
    streamed = "".join((chunk.choices[0].delta.content or "") for chunk in chunks if chunk.choices)
    assert streamed.strip() == text.strip()
    moea = (chunks[0].model_extra or {}).get("moea") or {}
    assert (moea.get("expert"), moea.get("version"), moea.get("routed")) == ("dates", 1, False)


def test_completions_endpoint_routes(client: openai.OpenAI, served: dict[str, object]) -> None:
    prompt = served["held_out"]["math"][0]  # type: ignore[index]
    raw = client.completions.with_raw_response.create(
        model="math", prompt=prompt, max_tokens=16, temperature=0.0
    )
    assert raw.headers["x-moea-expert"] == "math@1"
    assert raw.parse().choices[0].text is not None


def test_unknown_model_is_openai_404(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(model="no-such-expert", messages=[{"role": "user", "content": "hi"}])
    body = caught.value.body
    assert isinstance(body, dict) and "no-such-expert" in str(body.get("message", body))


def test_health_is_open(served: dict[str, object]) -> None:
    response = httpx.get(f"{served['base_url']}/health", timeout=5)
    assert response.status_code == 200 and response.json()["status"] == "ok"


def test_example_client_runs_against_the_server(served: dict[str, object]) -> None:
    """examples/client.py is what the README and the demo run: it must work as shipped."""
    result = subprocess.run(
        [
            sys.executable,
            str(EXAMPLES / "client.py"),
            "--base-url",
            f"{served['base_url']}/v1",
            "--per-task",
            "1",
            "--min-routing-accuracy",
            "0.75",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    for task in TASKS:
        assert f"{task}@1" in result.stdout


def test_served_answers_equal_moea_eval(client: openai.OpenAI, served: dict[str, object]) -> None:
    """What `moea eval` scores is what `moea serve` returns. `moea eval --endpoint` sends eval's rows as a
    client sends them (the user message only, no system message) through model="moe": the gateway must
    route them the same way and add each expert's trained system prompt, so that greedy answers equal
    eval's own `moe` answers. Near-tie flips (bf16 kernels differ between vLLM's offline engine and the
    server's batches) are counted and bounded, as in the other equivalence tests; without the system
    prompt, far more answers change."""
    tmp, env = served["tmp"], served["env"]
    assert isinstance(tmp, Path) and isinstance(env, dict)
    _moea(
        "eval",
        str(tmp / "run"),
        "--out",
        str(tmp / "eval"),
        "--systems",
        "moe",
        "--max-examples",
        "4",
        "--max-new-tokens",
        "24",
        "--endpoint",
        f"{served['base_url']}/v1",
        env=env,
    )
    report = json.loads((tmp / "eval" / "eval.json").read_text())
    rows = [json.loads(line) for line in (tmp / "eval" / "eval_outputs.jsonl").read_text().splitlines()]
    assert len(rows) >= 4 * len(TASKS) and report["served"]["requests"] == len(rows)
    assert all([m["role"] for m in row["messages"]] == ["user"] for row in rows)  # no client system prompt
    scored = [r for r in rows if "moe" in r["outputs"]]  # out-of-distribution prompts are routed only
    assert len(scored) >= 4 * len(TASKS) and report["served"]["compared_answers"] == len(scored)
    differ = [
        (r["messages"][0]["content"][:50], r["outputs"]["moe"], r["outputs"]["served"])
        for r in scored
        if r["outputs"]["moe"] != r["outputs"]["served"]
    ]
    assert len(differ) <= max(1, len(scored) // 10), f"{len(differ)} of {len(scored)} differ: {differ}"
    assert report["served"]["same_route"] >= 0.9
    assert report["served"]["same_answer_as_moe"] == pytest.approx(1 - len(differ) / len(scored))
    for task in TASKS:  # the served score is eval's score, up to the bounded flips
        systems = report["tasks"][task]["systems"]
        assert abs(systems["served"]["score"] - systems["moe"]["score"]) <= 0.25 + 1e-9
    # The answer says whose system prompt the expert got: the expert's own, as trained.
    _, _, moea = _chat(client, "sentiment", served["held_out"]["sentiment"][0])  # type: ignore[index]
    assert moea.get("system_prompt") == "expert"
    raw = client.chat.completions.with_raw_response.create(
        model="sentiment",
        max_tokens=4,
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Great phone!"}],
    )
    assert ((raw.parse().model_extra or {}).get("moea") or {}).get("system_prompt") == "client"


def test_sigterm_stops_the_vllm_child_too(served: dict[str, object]) -> None:
    """Runs last in this module: SIGTERM to `moea serve` alone must leave no orphan vLLM process."""
    import signal

    import psutil

    server = served["server"]
    assert isinstance(server, subprocess.Popen)
    children = psutil.Process(server.pid).children(recursive=True)
    assert children, "moea serve should own a vLLM child process"
    server.send_signal(signal.SIGTERM)
    server.wait(timeout=60)
    _, alive = psutil.wait_procs(children, timeout=30)
    assert not alive, f"orphans left after SIGTERM: {[p.pid for p in alive]}"
