"""The /ui dashboard in a real browser (Debian's chromium driven by Playwright for Python) against a live
`moea serve` (real vLLM) with a trained demo run registered twice (versions 1 and 2 of every expert) and a
running experiment: pages show the registered experts, an experiment's counts change after requests are
sent (the page polls, no reload), a `read` key is refused actions, an `admin` key promotes and the alias
history names it. Full-page screenshots of each page go to examples/results/ui/.

One served engine for the module: training the tiny run and starting vLLM take minutes on 2 CPU cores.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from registry.local import free_port
from registry.service import Registry
from serving.demo import REPO_EXAMPLES, prepare_run, stop_process_group, wait_until_ready

pytestmark = pytest.mark.slow

CHROMIUM = "/usr/bin/chromium"
SCREENSHOTS = Path(__file__).resolve().parents[2] / "examples" / "results" / "ui"
TASKS = ("sentiment", "math", "extraction", "dates")
OPS, READER, APP = "ops-browser-key-5e21", "reader-browser-key-c07a", "app-browser-key-913b"
# The tiny training of tests/e2e/test_demo.py: wiring, not quality.
TINY = (
    "train.max_steps=8", "train.batch_size=2", "train.eval_every=0", "train.eval_batches=1",
    "train.checkpoint_every=0", "train.log_every=4",
    "router.encoder=minilm", "router.heads=[centroid]", "router.max_train_per_task=40",
)  # fmt: skip


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    if not Path(CHROMIUM).exists():
        pytest.skip("Debian's chromium is not installed (`apt-get install chromium`; .ci/setup does it)")
    tmp = tmp_path_factory.mktemp("ui-browser")
    url, store = f"sqlite:///{tmp / 'registry.db'}", tmp / "store"
    env = {**os.environ, "MOEA_REGISTRY_URL": url, "MOEA_STORE_DIR": str(store), "PYTHONUNBUFFERED": "1"}
    prepare_run(REPO_EXAMPLES / "mixture.yaml", tmp / "run", False, TINY, env)  # trains, registers v1
    prepare_run(REPO_EXAMPLES / "mixture.yaml", tmp / "run", False, TINY, env)  # reuses it: v2
    with Registry(url, store) as registry:
        registry.start_experiment("sentiment", [(1, 0.5), (2, 0.5)], metric="thumbs", actor="ci")
    port = free_port()
    keys = [f"ops:{OPS}:admin", f"reader:{READER}:read", f"app:{APP}:chat,feedback"]
    log = (tmp / "serve.log").open("w")
    server = subprocess.Popen(
        [sys.executable, "-m", "serving.cli_root", "serve", "--host", "127.0.0.1", "--port", str(port),
         *(arg for key in keys for arg in ("--api-key", key))],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    base_url = f"http://127.0.0.1:{port}"
    try:
        wait_until_ready(base_url, server, timeout_s=900)
        yield {"base_url": base_url, "registry_url": url, "store": store}
    finally:
        stop_process_group(server)
        log.close()
        print((tmp / "serve.log").read_text()[-4000:])


@pytest.fixture(scope="module")
def browser(served: dict[str, Any]) -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield chromium
        chromium.close()


def _login(browser: Any, base_url: str, key: str) -> Any:
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.goto(f"{base_url}/ui/login")
    page.fill("#api_key", key)
    page.click("#login")
    page.wait_for_url(f"{base_url}/ui/experts")
    return page


def _shot(page: Any, name: str) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / f"{name}.png"), full_page=True)


def _experiment_requests(page: Any) -> int:
    cells = page.locator(
        "section.experiment[data-status=running] td[data-field=requests]"
    ).all_text_contents()
    return sum(int(text) for text in cells)


def _chat(client: openai.OpenAI, model: str, prompt: str, user: str) -> str:
    raw = client.chat.completions.with_raw_response.create(
        model=model, messages=[{"role": "user", "content": prompt}], max_tokens=4, temperature=0.0, user=user
    )
    return raw.headers.get("x-moea-experiment", "")


def test_pages_show_experts_and_live_experiment_counts(browser: Any, served: dict[str, Any]) -> None:
    base_url = served["base_url"]
    page = _login(browser, base_url, READER)
    for task in TASKS:
        assert page.locator(f"section#x-{task} h2").count() == 1
        assert f"{task}@2" in page.locator(f"section#x-{task}").inner_text()
    assert page.locator("a.promote").count() == 0  # a read key is offered no actions
    _shot(page, "experts")

    page.goto(f"{base_url}/ui/experiments")
    page.wait_for_selector("svg.chart polyline", state="attached")  # drawn from the JSON endpoint
    before = _experiment_requests(page)
    client = openai.OpenAI(base_url=f"{base_url}/v1", api_key=APP, max_retries=0)
    in_experiment = [
        _chat(client, "sentiment", f"Review {i}: the phone case was great.", f"u{i}") for i in range(8)
    ]
    assert all(in_experiment), "requests to model=sentiment were not assigned to the experiment"
    for prompt in (
        "Tom has 3 apples and buys 4 more. How many apples?",
        "Extract the date: met on 2021-03-04.",
    ):
        _chat(client, "moe", prompt, "router-user")
    # No reload: the page polls /ui/api/experiments/<id> and rewrites the counts (the log flushes each second).
    page.wait_for_function(
        "want => [...document.querySelectorAll('section.experiment[data-status=running] td[data-field=requests]')]"
        ".reduce((sum, cell) => sum + Number(cell.textContent), 0) >= want",
        arg=before + 8,
        timeout=60_000,
    )
    assert _experiment_requests(page) == before + 8
    _shot(page, "experiments")

    page.goto(f"{base_url}/ui/routing")
    assert page.locator("#router-ref").inner_text().startswith("router@")
    assert "sentiment@" in page.locator("#recent").inner_text()
    _shot(page, "routing")
    page.goto(f"{base_url}/ui/engines")
    assert "healthy" in page.locator("#engines").inner_text()
    _shot(page, "engines")


def test_actions_need_admin_and_a_promote_records_the_key(browser: Any, served: dict[str, Any]) -> None:
    base_url = served["base_url"]
    reader = _login(browser, base_url, READER)
    reader.goto(f"{base_url}/ui/confirm/promote?expert=math&version=2&alias=prod")
    assert "lacks the scope" in reader.locator("#denied").inner_text()
    reader.close()

    admin = _login(browser, base_url, OPS)
    admin.click("section#x-math a.promote")  # math@2: the only version without prod
    admin.wait_for_selector("#confirm")
    admin.fill("input[name=reason]", "browser test")
    admin.click("#confirm")
    admin.wait_for_selector("#flash")
    assert "math@2 now holds prod" in admin.locator("#flash").inner_text()
    with Registry(served["registry_url"], served["store"]) as registry:
        moved = registry.history("math", "prod")[-1]
    assert (moved.actor, moved.to_version, moved.action) == ("ops", 2, "promote")
    admin.locator("section#x-math summary").click()
    assert "ops" in admin.locator("section#x-math table.history td.actor").first.inner_text()
    deadline = time.monotonic() + 120  # the gateway's watcher applies the new state (loads math@2 first)
    while time.monotonic() < deadline:
        admin.goto(f"{base_url}/ui/experts")
        if admin.locator("td.serving[data-expert=math]").inner_text() == "math@2":
            break
        time.sleep(2)
    assert admin.locator("td.serving[data-expert=math]").inner_text() == "math@2"
    _shot(admin, "experts-after-promote")
