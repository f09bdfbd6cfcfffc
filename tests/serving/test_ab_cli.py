"""`moea ab start|status|list|stop|report` against a real SQLite registry (click's CliRunner)."""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime, timedelta
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest
from click.testing import CliRunner, Result

from registry.service import Registry
from registry.views import OutcomeRecord, RequestRecord
from serving.ab.assign import assign_arm
from serving.ab.cli import ab_group

from .registry_fixtures import make_run_dir

T0 = datetime(2025, 1, 1, tzinfo=UTC)


@pytest.fixture
def url(isolated_home: Path, tmp_path: Path) -> str:
    """A registry with versions 1, 2 and 3 of `summarize`, prod on version 1."""
    registry_url = os.environ["MOEA_REGISTRY_URL"]
    with Registry(registry_url) as registry:
        for seed in (1, 2, 3):
            registry.register_run(make_run_dir(tmp_path, ["summarize"], seed))
        registry.promote("summarize@1")
    return registry_url


def ab(*args: str) -> Result:
    return CliRunner().invoke(ab_group, list(args), catch_exceptions=False)


def log_traffic(url: str, experiment_id: int, users: int, mean_reward: dict[int, float]) -> None:
    """What the gateway would log: users assigned by assign_arm, one request and one reward each."""
    rng = np.random.default_rng(0)
    with Registry(url) as registry:
        experiment = registry.get_experiment(experiment_id)
        requests, outcomes = [], []
        for index in range(users):
            version = assign_arm(experiment, f"user-{index}")
            request_id = f"chatcmpl-{index}"
            requests.append(
                RequestRecord(
                    request_id,
                    T0,
                    "summarize",
                    version,
                    experiment_id,
                    f"user-{index}",
                    False,
                    float(rng.normal(120, 10)),
                    12,
                    30,
                    200,
                )
            )
            outcomes.append(
                OutcomeRecord(
                    request_id, T0 + timedelta(seconds=2), reward=float(rng.normal(mean_reward[version], 0.2))
                )
            )
        registry.log_requests(requests)
        registry.record_outcomes(outcomes)


def test_start_status_report_stop_with_winner(url: str, tmp_path: Path) -> None:
    started = ab(
        "start", "summarize", "--arm", "1:50", "--arm", "2:50", "--salt", "s1", "--registry-url", url
    )
    assert started.exit_code == 0, started.output
    assert "started experiment" in started.output and "@1 50%, @2 50%" in started.output

    status = ab("status")  # $MOEA_REGISTRY_URL from isolated_home
    assert status.exit_code == 0 and "summarize" in status.output and "running" in status.output
    (listed,) = json.loads(ab("status", "summarize", "--json").output)
    assert listed["arms"] == [{"version": 1, "weight": 50.0}, {"version": 2, "weight": 50.0}]
    assert listed["salt"] == "s1" and listed["metric"] == "reward"

    log_traffic(url, listed["id"], users=600, mean_reward={1: 0.50, 2: 0.60})
    out = tmp_path / "reports" / "summarize.md"
    report = ab("report", "summarize", "--out", str(out), "--min-samples", "100")
    assert report.exit_code == 0, report.output
    assert "summarize@1" in report.output and "welch t" in report.output
    assert "--winner 2" in report.output  # the recommendation
    assert out.read_text().startswith("## A/B report")
    assert matplotlib.image.imread(out.with_suffix(".png")).shape[1] > 800

    as_json = json.loads(ab("report", str(listed["id"]), "--json", "--out", str(tmp_path / "r.png")).output)
    assert as_json["recommendation"]["winner"] == 2 and as_json["srm"]["flagged"] is False
    assert sum(arm["requests"] for arm in as_json["arms"]) == 600
    assert Path(as_json["plot"]).is_file()

    stopped = ab("stop", "summarize", "--winner", "2")
    assert stopped.exit_code == 0, stopped.output
    assert "summarize@2 is now summarize@prod" in stopped.output
    with Registry(url) as registry:
        assert registry.resolve("summarize@prod").version == 2
        moves = [(e.from_version, e.to_version, e.reason) for e in registry.history("summarize", "prod")]
        assert (1, 2, f"experiment {listed['id']} winner") in moves
        assert registry.active_experiment("summarize") is None
    assert "no experiments running" in ab("status").output
    (history,) = json.loads(ab("list", "--json").output)
    assert history["status"] == "stopped" and history["winner"] == 2


def test_report_refuses_a_winner_with_few_outcomes(url: str, tmp_path: Path) -> None:
    assert ab("start", "summarize", "--arm", "1:50", "--arm", "2:50").exit_code == 0
    experiment_id = json.loads(ab("status", "--json").output)[0]["id"]
    log_traffic(url, experiment_id, users=40, mean_reward={1: 0.2, 2: 0.9})
    result = ab("report", "summarize", "--out", str(tmp_path / "small.md"))
    assert result.exit_code == 0
    assert "Keep running: no winner before 100 users with outcomes per arm" in " ".join(result.output.split())


def test_stop_without_winner_keeps_prod(url: str) -> None:
    assert ab("start", "summarize", "--arm", "1:90", "--arm", "3:10", "--metric", "thumbs").exit_code == 0
    result = ab("stop", "summarize")
    assert result.exit_code == 0 and "now" not in result.output
    with Registry(url) as registry:
        assert registry.resolve("summarize@prod").version == 1


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["start", "summarize", "--arm", "1:50", "--arm", "2"], "is not VERSION:WEIGHT"),
        (["start", "summarize", "--arm", "1:100"], "needs two --arm"),
        (["start", "summarize", "--arm", "1:50", "--arm", "1:50"], "distinct"),
        (["start", "summarize", "--arm", "1:50", "--arm", "2:50", "--shadow", "2"], "also an arm"),
        (["start", "summarize", "--arm", "1:50", "--arm", "9:50"], "summarize@9"),
        (["start", "nosuch", "--arm", "1:50", "--arm", "2:50"], "nosuch"),
        (["stop", "summarize"], "no experiment is running"),
        (
            ["start", "summarize", "--arm", "1:50", "--arm", "2:50", "--guardrail", "errors<=1"],
            "unknown metric",
        ),
        (
            ["start", "summarize", "--arm", "1:50", "--arm", "2:50", "--guardrail", "thumbs=0.5"],
            "METRIC<=BOUND",
        ),
        (["start", "summarize", "--arm", "1", "--arm", "2", "--ramp", "5,1"], "increasing treatment"),
        (
            ["start", "summarize", "--arm", "1", "--arm", "2", "--arm", "3", "--ramp", "1,5"],
            "exactly two --arm",
        ),
        (["report", "summarize"], "has no experiments"),
    ],
)
def test_errors_are_one_line(url: str, args: list[str], message: str) -> None:
    result = CliRunner().invoke(ab_group, args)
    assert result.exit_code == 1, result.output
    assert result.output.startswith("Error: ") and message in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_second_start_conflicts_and_wrong_winner_is_refused(url: str) -> None:
    assert ab("start", "summarize", "--arm", "1:50", "--arm", "2:50", "--shadow", "3").exit_code == 0
    again = CliRunner().invoke(ab_group, ["start", "summarize", "--arm", "1:50", "--arm", "3:50"])
    assert again.exit_code == 1 and "already running" in again.output
    wrong = CliRunner().invoke(ab_group, ["stop", "summarize", "--winner", "3"])
    assert wrong.exit_code == 1 and "not an arm" in wrong.output
    with Registry(url) as registry:
        running = registry.active_experiment("summarize")
        assert running is not None and running.shadow_version == 3


def test_report_unit_and_verdict_options(url: str, tmp_path: Path) -> None:
    assert ab("start", "summarize", "--arm", "1:50", "--arm", "2:50").exit_code == 0
    experiment_id = json.loads(ab("status", "--json").output)[0]["id"]
    log_traffic(url, experiment_id, users=300, mean_reward={1: 0.5, 2: 0.5})
    default = json.loads(ab("report", "summarize", "--json", "--out", str(tmp_path / "a.png")).output)
    assert default["unit"] == "user" and default["verdict"] == "sequential"
    comparison = default["comparisons"][0]
    assert comparison["sequential"]["p_value"] is not None and comparison["mde"] > 0
    assert comparison["mde_sequential"] > comparison["mde"]
    per_request = ab(
        "report", "summarize", "--unit", "request", "--verdict", "fixed", "--out", str(tmp_path / "b.md")
    )
    assert per_request.exit_code == 0, per_request.output
    text = " ".join(per_request.output.split())
    assert "per request" in text and "verdict fixed" in text and "Always-valid p" in text
    assert "Fixed-horizon verdict" in text


def test_start_with_guardrails_and_ramp_stores_them(url: str) -> None:
    started = ab(
        "start", "summarize", "--arm", "1", "--arm", "2", "--ramp", "1,5,25,50",
        "--guardrail", "error_rate <= 0.02", "--guardrail", "p95_latency_ms<=1.2x", "--guardrail", "thumbs>=-0.05",
        "--ramp-step-minutes", "30", "--ramp-min-units", "50", "--guardrail-alpha", "0.02",
    )  # fmt: skip
    assert started.exit_code == 0, started.output
    assert "@1 99%, @2 1%" in started.output
    assert "guardrails error_rate<=0.02, p95_latency_ms<=1.2x, thumbs>=-0.05" in started.output
    assert "ramp 1,5,25,50% (step 1/4)" in started.output
    (listed,) = json.loads(ab("status", "--json").output)
    assert listed["arms"] == [{"version": 1, "weight": 99.0}, {"version": 2, "weight": 1.0}]
    assert listed["guardrails"] == ["error_rate<=0.02", "p95_latency_ms<=1.2x", "thumbs>=-0.05"]
    assert listed["ramp"] == [1.0, 5.0, 25.0, 50.0] and listed["ramp_step"] == 0
    assert listed["guard_settings"] == {"alpha": 0.02, "min_units": 30, "step_s": 1800.0, "step_units": 50}
    assert listed["stop_reason"] == ""
    assert "error_rate<=0.02" in ab("status").output

    with Registry(url) as registry:
        registry.guardrail_stop(listed["id"], "guardrail error_rate<=0.02 breached by summarize@2: test")
    shown = ab("list").output
    assert f"experiment {listed['id']} stopped: guardrail error_rate<=0.02 breached" in shown
