"""Idempotent request log inserts (migration 0003_spool): a record sent twice is stored once."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy import text

from registry import db
from registry.service import Registry
from registry.views import OutcomeRecord, RequestRecord

T0 = datetime(2025, 1, 1, tzinfo=UTC)


def make_request(request_id: str, shadow: bool = False, latency_ms: float = 1.0) -> RequestRecord:
    return RequestRecord(request_id, T0, "summarize", 1, None, "u", False, latency_ms, 1, 2, 200, shadow)


def rows(registry: Registry, sql: str) -> list[tuple]:
    with registry.engine.connect() as connection:
        return [tuple(row) for row in connection.execute(text(sql))]


def test_a_request_logged_again_is_skipped(registry: Registry) -> None:
    registry.log_requests([make_request("a"), make_request("b"), make_request("b", shadow=True)])
    # A batch sent again after a crash, with one new record in it; the repeat's other fields don't matter.
    registry.log_requests(
        [make_request("a", latency_ms=99.0), make_request("b", shadow=True), make_request("c")]
    )
    logged = rows(registry, "SELECT request_id, shadow, latency_ms FROM requests ORDER BY id")
    assert logged == [("a", False, 1.0), ("b", False, 1.0), ("b", True, 1.0), ("c", False, 1.0)]


def test_an_outcome_with_an_id_is_stored_once(registry: Registry) -> None:
    registry.record_outcomes(
        [
            OutcomeRecord("a", T0, reward=1.0, outcome_id="o1"),
            OutcomeRecord("a", T0, reward=1.0, outcome_id="o1"),  # repeated inside one batch too
            OutcomeRecord("a", T0, thumbs=True),  # no id: always inserted, as before
            OutcomeRecord("a", T0, thumbs=True),
        ]
    )
    registry.record_outcomes([OutcomeRecord("a", T0, reward=1.0, outcome_id="o1")])
    stored = rows(registry, "SELECT outcome_id, reward, thumbs FROM outcomes ORDER BY id")
    assert stored == [("o1", 1.0, None), (None, None, True), (None, None, True)]


def test_upgrade_keeps_the_first_of_repeated_requests(tmp_path: Path) -> None:
    """Rows the old writer could have stored twice (a retried batch that had committed) are merged."""
    url = f"sqlite:///{tmp_path / 'registry.db'}"
    engine = db.open_engine(url, upgrade=False)
    db.upgrade(engine, "0002_aliases_experiments")
    insert = (
        "INSERT INTO requests (request_id, created_at, routed, latency_ms, prompt_tokens, completion_tokens,"
        " status_code, shadow) VALUES (:id, '2025-01-01 00:00:00', 0, :latency, 0, 0, 200, :shadow)"
    )
    with engine.begin() as connection:
        for request_id, latency, shadow in [("a", 1, 0), ("a", 2, 0), ("a", 3, 1), ("b", 4, 0), ("a", 5, 0)]:
            connection.execute(text(insert), {"id": request_id, "latency": latency, "shadow": shadow})
    registry = Registry(url, tmp_path / "store")  # upgrades to head
    assert rows(registry, "SELECT request_id, latency_ms, shadow FROM requests ORDER BY id") == [
        ("a", 1.0, False),
        ("a", 3.0, True),
        ("b", 4.0, False),
    ]
    registry.log_requests([make_request("a"), make_request("d")])
    assert [r[0] for r in rows(registry, "SELECT request_id FROM requests ORDER BY id")] == [
        "a",
        "a",
        "b",
        "d",
    ]
