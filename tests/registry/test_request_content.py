"""Request content (`moea serve --log-content`) in a real SQLite registry: stored once with its request row,
absent without content, read back with the standing rating, and purged by date (`moea registry purge-content`)
with the request rows kept."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import sqlalchemy as sa
from click.testing import CliRunner
from helpers import make_request, make_run_dir

from registry.cli import main
from registry.service import Registry
from registry.views import OutcomeRecord

MESSAGES = [{"role": "user", "content": "Summarize: the cat sat."}]


def _count(registry: Registry, table: str) -> int:
    with registry.engine.connect() as connection:
        return connection.execute(sa.text(f"SELECT COUNT(*) FROM {table}")).scalar_one()


def test_content_is_stored_once_with_its_request_and_only_when_given(
    registry_url: str, tmp_path: Path
) -> None:
    registry = Registry(registry_url, tmp_path / "store")
    registry.register_run(make_run_dir(tmp_path / "run"))
    with_content = replace(make_request("chatcmpl-a", None), messages=MESSAGES, answer="A cat sat.")
    shadow = replace(make_request("chatcmpl-a", None, shadow=True), messages=MESSAGES, answer="Cat.")
    without = make_request("chatcmpl-b", None)
    batch = [with_content, shadow, without]
    registry.log_requests(batch)
    registry.log_requests(batch)  # the spool drained twice after a crash: nothing is added
    assert (_count(registry, "requests"), _count(registry, "request_content")) == (3, 2)
    registry.record_outcomes([OutcomeRecord("chatcmpl-a", datetime.now(UTC), thumbs=False, outcome_id="o1")])
    registry.record_outcomes([OutcomeRecord("chatcmpl-a", datetime.now(UTC), thumbs=True, outcome_id="o2")])
    registry.record_outcomes([OutcomeRecord("chatcmpl-b", datetime.now(UTC), reward=0.5, outcome_id="o3")])

    answers = {a.request_id: a for a in registry.logged_answers("summarize")}
    assert set(answers) == {"chatcmpl-a", "chatcmpl-b"}  # the shadow copy is never rated
    assert (answers["chatcmpl-a"].messages, answers["chatcmpl-a"].answer) == (MESSAGES, "A cat sat.")
    assert answers["chatcmpl-a"].thumbs is True  # the latest rating (the key's own update) stands
    assert answers["chatcmpl-b"].has_content is False and answers["chatcmpl-b"].reward == 0.5
    assert registry.logged_answers("classify") == []
    registry.close()


def test_purge_content_deletes_old_content_and_keeps_the_request_rows(isolated_home: Path) -> None:
    registry = Registry()
    now = datetime.now(UTC)
    old = replace(
        make_request("old", None), created_at=now - timedelta(days=40), messages=MESSAGES, answer="x"
    )
    new = replace(make_request("new", None), created_at=now, messages=MESSAGES, answer="y")
    registry.log_requests([old, new])
    cutoff = (now - timedelta(days=30)).strftime("%Y-%m-%d")

    result = CliRunner().invoke(
        main, ["registry", "purge-content", "--before", cutoff], catch_exceptions=False
    )
    assert result.exit_code == 0, result.output
    assert f"purged the content of 1 request(s) logged before {cutoff} 00:00:00 UTC" in result.output
    assert (_count(registry, "requests"), registry.count_content()) == (2, 1)
    with registry.engine.connect() as connection:
        kept = connection.execute(sa.text("SELECT request_id FROM request_content")).scalars().all()
    assert kept == ["new"]
    assert registry.purge_content(now - timedelta(days=30)) == 0  # nothing older is left
    assert registry.purge_content(now + timedelta(seconds=1)) == 1
    assert (_count(registry, "requests"), registry.count_content()) == (2, 0)
    registry.close()


def test_purge_content_refuses_a_malformed_date(isolated_home: Path) -> None:
    result = CliRunner().invoke(main, ["registry", "purge-content", "--before", "last tuesday"])
    assert result.exit_code == 2 and "'last tuesday' does not match the formats" in result.output
