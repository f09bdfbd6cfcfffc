"""The /ui dashboard of `moea serve` against a real SQLite registry filled through the registry API, with
FastAPI's TestClient: pages render what the registry holds, the `read` scope sees pages but cannot act,
admin actions need the confirmation form's token and record the key's name in the alias history, the
experiment numbers are the A/B report's, and the SQL statements a page issues do not grow with the
number of experts or logged requests (render times: benchmarks/bench_ui.py)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import event

from registry.service import Registry
from serving.ab.report import build_report
from serving.app import create_app
from serving.ui import pages, queries

from .ui_fixtures import (
    APP,
    EXPERIMENT_EXPERT,
    OPS,
    READER,
    Filled,
    bearer,
    fill_registry,
    log_requests,
    make_gateway,
)

PAGES = ("/ui/experts", "/ui/routing", "/ui/experiments", "/ui/engines")


@dataclass
class Dashboard:
    registry: Registry
    client: TestClient
    filled: Filled
    gateway: Any


def _dashboard(tmp_path: Path, experts: int, requests: int, keys: tuple[str, ...] | None = None) -> Dashboard:
    registry = Registry(f"sqlite:///{tmp_path / 'registry.db'}", tmp_path / "store")
    filled = fill_registry(registry, tmp_path, experts, requests)
    gateway = make_gateway(registry) if keys is None else make_gateway(registry, keys)
    return Dashboard(registry, TestClient(create_app(gateway)), filled, gateway)


@pytest.fixture
def ui(tmp_path: Path) -> Iterator[Dashboard]:
    dashboard = _dashboard(tmp_path, experts=3, requests=120)
    yield dashboard
    dashboard.registry.close()


def _token(html: str) -> str:
    match = re.search(r'name="token" value="([0-9a-f]+)"', html)
    assert match, html[-2000:]
    return match.group(1)


def test_pages_render_registry_content_for_a_read_key(ui: Dashboard) -> None:
    pages_html = {path: ui.client.get(path, headers=bearer(READER)) for path in PAGES}
    assert all(response.status_code == 200 for response in pages_html.values())
    experts = pages_html["/ui/experts"].text
    for name in ui.filled.experts:
        assert f'id="x-{name}"' in experts
        assert f"{name}@2" in experts
    assert "back for the experiment" in experts  # the alias history with its reasons
    assert f'data-expert="{EXPERIMENT_EXPERT}">{EXPERIMENT_EXPERT}@1<' in experts  # what the gateway serves
    assert "promote to prod" not in experts  # no actions offered to a read key
    experiments = pages_html["/ui/experiments"].text
    assert f"{EXPERIMENT_EXPERT}@1 (control)" in experiments and "SRM check" in experiments
    routing = pages_html["/ui/routing"].text
    assert "share sent to base" in routing and "chatcmpl-" in routing
    assert "down" in pages_html["/ui/engines"].text  # no engine runs behind this gateway


def test_no_key_goes_to_the_login_form_and_the_cookie_lets_the_browser_in(ui: Dashboard) -> None:
    response = ui.client.get("/ui/experts", follow_redirects=False)
    assert response.status_code == 303 and response.headers["location"].startswith("/ui/login")
    refused = ui.client.post("/ui/login", data={"api_key": "wrong", "next": "/ui/routing"})
    assert refused.status_code == 401 and "unknown API key" in refused.text
    ui.client.post("/ui/login", data={"api_key": READER, "next": "/ui/routing"}, follow_redirects=False)
    page = ui.client.get("/ui/routing")
    assert page.status_code == 200 and "key <b>reader</b>" in page.text
    assert ui.client.get("/ui/api/experiments/1", headers=bearer(APP)).status_code == 403  # chat key: no read


def test_a_read_key_sees_pages_but_cannot_act(ui: Dashboard) -> None:
    before = ui.registry.resolve(f"{EXPERIMENT_EXPERT}@prod").version
    confirm = ui.client.get(
        f"/ui/confirm/promote?expert={EXPERIMENT_EXPERT}&version=2", headers=bearer(READER)
    )
    assert confirm.status_code == 403 and "lacks the scope" in confirm.text
    admin_token = _token(ui.client.get(f"/ui/confirm/promote?expert={EXPERIMENT_EXPERT}&version=2",
                                       headers=bearer(OPS)).text)  # fmt: skip
    form = {"expert": EXPERIMENT_EXPERT, "version": "2", "alias": "prod", "token": admin_token}
    for action in ("promote", "rollback", "stop"):
        response = ui.client.post(f"/ui/actions/{action}", data=form, headers=bearer(READER))
        assert response.status_code == 403, action
    assert ui.registry.resolve(f"{EXPERIMENT_EXPERT}@prod").version == before
    assert ui.registry.active_experiment(EXPERIMENT_EXPERT) is not None


def test_admin_promote_is_confirmed_then_recorded_with_the_key_name(ui: Dashboard) -> None:
    name = ui.filled.experts[1]
    confirm = ui.client.get(f"/ui/confirm/promote?expert={name}&version=2&alias=prod", headers=bearer(OPS))
    assert confirm.status_code == 200 and "Recorded in the alias history as <b>ops</b>" in confirm.text
    assert ui.registry.resolve(f"{name}@prod").version == 1  # the confirmation page moved nothing
    done = ui.client.post("/ui/actions/promote", headers=bearer(OPS), follow_redirects=False,
                          data={"expert": name, "version": "2", "alias": "prod", "reason": "looks good",
                                "token": _token(confirm.text)})  # fmt: skip
    assert done.status_code == 303 and "flash=" in done.headers["location"]
    assert ui.registry.resolve(f"{name}@prod").version == 2
    event_ = ui.registry.history(name, "prod")[-1]
    assert (event_.action, event_.actor, event_.to_version) == ("promote", "ops", 2)
    assert event_.reason.startswith("looks good; not gated")  # the CLI's eval gate ran (nothing to compare)
    page = ui.client.get(done.headers["location"], headers=bearer(OPS)).text
    assert f"{name}@2 now holds prod" in page and '<td class="actor">ops</td>' in page


def test_admin_rollback_and_stop_with_a_winner_name_the_key(ui: Dashboard) -> None:
    token = _token(
        ui.client.get(f"/ui/confirm/rollback?expert={EXPERIMENT_EXPERT}", headers=bearer(OPS)).text
    )
    ui.client.post("/ui/actions/rollback", headers=bearer(OPS),
                   data={"expert": EXPERIMENT_EXPERT, "alias": "prod", "token": token})  # fmt: skip
    rolled = ui.registry.history(EXPERIMENT_EXPERT, "prod")[-1]
    assert (rolled.action, rolled.actor, rolled.to_version) == ("rollback", "ops", 2)
    ui.client.post("/ui/actions/stop", headers=bearer(OPS),
                   data={"expert": EXPERIMENT_EXPERT, "winner": "1", "token": token})  # fmt: skip
    stopped = ui.registry.get_experiment(ui.filled.experiment_id)
    assert (stopped.status, stopped.winner) == ("stopped", 1)
    won = ui.registry.history(EXPERIMENT_EXPERT, "prod")[-1]
    assert (won.actor, won.to_version) == ("ops", 1)


def test_a_refused_action_says_why_and_a_forged_token_moves_nothing(ui: Dashboard) -> None:
    token = _token(ui.client.get(f"/ui/confirm/stop?expert={EXPERIMENT_EXPERT}", headers=bearer(OPS)).text)
    bad = ui.client.post("/ui/actions/stop", headers=bearer(OPS), follow_redirects=False,
                         data={"expert": EXPERIMENT_EXPERT, "winner": "7", "token": token})  # fmt: skip
    assert bad.status_code == 303 and "error=" in bad.headers["location"]
    assert "is not an arm" in ui.client.get(bad.headers["location"], headers=bearer(OPS)).text
    forged = ui.client.post("/ui/actions/stop", headers=bearer(OPS),
                            data={"expert": EXPERIMENT_EXPERT, "winner": "1", "token": "0" * 64})  # fmt: skip
    assert forged.status_code == 400
    assert ui.registry.active_experiment(EXPERIMENT_EXPERT) is not None


def test_experiment_numbers_are_the_ab_reports_and_follow_the_log(ui: Dashboard) -> None:
    url = f"/ui/api/experiments/{ui.filled.experiment_id}"
    first = ui.client.get(url, headers=bearer(READER)).json()
    report = pages.report_summary(build_report(ui.registry, ui.filled.experiment_id))  # `moea ab report`'s
    assert first["report"]["arms"] == report["arms"] and first["report"]["srm"] == report["srm"]
    assert sum(arm["requests"] for arm in first["report"]["arms"]) == 60
    requests, outcomes = queries.experiments_data(ui.registry.engine, [ui.filled.experiment_id])
    assert requests[ui.filled.experiment_id] == ui.registry.experiment_requests(ui.filled.experiment_id)
    assert outcomes[ui.filled.experiment_id] == ui.registry.experiment_outcomes(ui.filled.experiment_id)
    log_requests(ui.registry, ui.filled.experts, ui.filled.experiment_id, 40, seed=9)
    second = ui.client.get(url, headers=bearer(READER)).json()
    assert sum(arm["requests"] for arm in second["report"]["arms"]) == 80
    assert [s["points"][-1]["requests"] for s in second["series"]] == [
        a["requests"] for a in second["report"]["arms"]
    ]


def test_the_catalog_read_equals_the_registrys_own_views(ui: Dashboard) -> None:
    catalog = queries.expert_catalog(ui.registry.engine)
    for name in ui.filled.experts:
        ours = [replace(view, size=0) for view in catalog.versions[name]]
        assert ours == ui.registry.list_versions(name)
        assert catalog.history[name] == ui.registry.history(name)
        assert catalog.versions[name][0].size == ui.registry.get_version(name, 1).size


def test_an_open_gateway_serves_pages_and_actions_without_keys(tmp_path: Path) -> None:
    dashboard = _dashboard(tmp_path, experts=2, requests=10, keys=())
    try:
        assert dashboard.client.get("/ui/experts").status_code == 200
        name = dashboard.filled.experts[1]
        token = _token(dashboard.client.get(f"/ui/confirm/promote?expert={name}&version=2").text)
        dashboard.client.post("/ui/actions/promote", data={"expert": name, "version": "2", "token": token})
        assert dashboard.registry.resolve(f"{name}@prod").version == 2
    finally:
        dashboard.registry.close()


def _statements_per_page(dashboard: Dashboard) -> dict[str, int]:
    counts: dict[str, int] = {}
    current = {"n": 0}

    def count(*_: Any) -> None:
        current["n"] += 1

    event.listen(dashboard.registry.engine, "before_cursor_execute", count)
    try:
        for path in (*PAGES, f"/ui/api/experiments/{dashboard.filled.experiment_id}"):
            dashboard.client.get(path, headers=bearer(READER))  # warm (first connection's pragmas)
            current["n"] = 0
            assert dashboard.client.get(path, headers=bearer(READER)).status_code == 200
            counts[path] = current["n"]
    finally:
        event.remove(dashboard.registry.engine, "before_cursor_execute", count)
    return counts


def test_sql_statements_per_page_do_not_grow_with_experts_and_requests(tmp_path: Path) -> None:
    small = _dashboard(tmp_path / "small", experts=2, requests=20)
    large = _dashboard(tmp_path / "large", experts=100, requests=10_000)
    try:
        small_counts, large_counts = _statements_per_page(small), _statements_per_page(large)
        assert small_counts == large_counts
        assert max(large_counts.values()) <= 6, large_counts
    finally:
        small.registry.close()
        large.registry.close()


def test_the_grafana_dashboard_queries_only_metrics_moea_serve_exports() -> None:
    import json

    from prometheus_client import CollectorRegistry

    from serving.metrics import GatewayMetrics
    from serving.request_spool import WriterMetrics

    exported = {family.name for family in GatewayMetrics().registry.collect()}
    writer = CollectorRegistry()
    WriterMetrics(writer)
    exported |= {family.name for family in writer.collect()}
    dashboard = json.loads((Path(__file__).parents[2] / "examples" / "grafana" / "moea.json").read_text())
    queried = {
        re.sub(r"_(total|bucket|count|sum)$", "", name)
        for panel in dashboard["panels"]
        for target in panel["targets"]
        for name in re.findall(r"\bmoea_[a-z_]+", target["expr"])
    }
    assert queried and queried <= exported, sorted(queried - exported)
    assert {
        "moea_requests",
        "moea_request_latency_seconds",
        "moea_router_decisions",
        "moea_engine_healthy",
    } <= queried


def test_recent_requests_show_logged_content_escaped_and_nothing_without_it(ui: Dashboard) -> None:
    from datetime import UTC, datetime

    from registry.views import RequestRecord

    said = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "Is <b>this</b> good?"}]
    with_content = RequestRecord("chatcmpl-with-content", datetime.now(UTC), None, None, None, None, True,
                                 30.0, 5, 2, 200, messages=said, answer="yes & no")  # fmt: skip
    without = RequestRecord("chatcmpl-no-content", datetime.now(UTC), None, None, None, None, True,
                            30.0, 5, 2, 200)  # fmt: skip
    ui.registry.log_requests([with_content, without])
    routing = ui.client.get("/ui/routing", headers=bearer(READER)).text
    assert "Is &lt;b&gt;this&lt;/b&gt; good?" in routing and "<b>this</b>" not in routing
    assert "yes &amp; no" in routing and "be brief" not in routing  # the prompt is the last user message
    recent = {r.request_id: r for r in queries.recent_requests(ui.registry.engine, 10)}
    assert recent["chatcmpl-with-content"].messages == said
    assert recent["chatcmpl-no-content"].messages is None and recent["chatcmpl-no-content"].answer is None


def test_an_experiment_without_outcomes_says_so_instead_of_a_p_value(tmp_path: Path) -> None:
    registry = Registry(f"sqlite:///{tmp_path / 'registry.db'}", tmp_path / "store")
    try:
        filled = fill_registry(registry, tmp_path, experts=2, requests=0)
        client = TestClient(create_app(make_gateway(registry)))
        html = client.get("/ui/experiments", headers=bearer(READER)).text
        assert 'data-field="comparison">no outcomes to compare yet<' in html and "], p " not in html
        data = client.get(f"/ui/api/experiments/{filled.experiment_id}", headers=bearer(READER)).json()
        assert "no outcomes" not in str(data)  # the JSON carries numbers (None), the script words them
    finally:
        registry.close()
