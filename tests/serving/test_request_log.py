"""The background request-log writer against a real SQLite registry."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy.exc import OperationalError

from registry.service import Registry
from registry.views import ExperimentView, OutcomeRecord, RequestRecord
from serving.request_log import RequestLogWriter
from serving.request_spool import encode

from .registry_fixtures import make_run_dir

T0 = datetime(2025, 1, 1, tzinfo=UTC)


@pytest.fixture
def registry(registry_url: str, tmp_path: Path) -> Registry:
    reg = Registry(registry_url, store_dir=tmp_path / "store")
    yield reg
    reg.close()


@pytest.fixture
def experiment(registry: Registry, tmp_path: Path) -> ExperimentView:
    for seed in (1, 2):
        registry.register_run(make_run_dir(tmp_path, ["summarize"], seed))
    return registry.start_experiment("summarize", [(1, 50), (2, 50)], metric="reward")


def request(index: int, experiment_id: int | None) -> RequestRecord:
    return RequestRecord(
        request_id=f"chatcmpl-{index}",
        created_at=T0 + timedelta(milliseconds=index),
        expert="summarize",
        version=1 + index % 2,
        experiment_id=experiment_id,
        user=f"user-{index % 50}",
        routed=False,
        latency_ms=100.0 + index,
        prompt_tokens=10,
        completion_tokens=20,
        status_code=200,
    )


def outcome(index: int) -> OutcomeRecord:
    return OutcomeRecord(
        request_id=f"chatcmpl-{index}", created_at=T0 + timedelta(seconds=5), reward=index / 10
    )


def test_close_writes_everything_submitted_from_many_threads(
    registry: Registry, experiment: ExperimentView
) -> None:
    writer = RequestLogWriter(registry, batch_size=60, flush_interval_s=60.0).start()  # 1600 % 60 != 0

    def client(offset: int) -> None:
        for index in range(offset, offset + 300):
            assert writer.submit_request(request(index, experiment.id))
            if index % 3 == 0:
                assert writer.submit_outcome(outcome(index))

    threads = [threading.Thread(target=client, args=(offset,)) for offset in (0, 300, 600, 900)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    stats = writer.close()

    requests = registry.experiment_requests(experiment.id)
    outcomes = registry.experiment_outcomes(experiment.id)
    assert sorted(r.request_id for r in requests) == sorted(f"chatcmpl-{i}" for i in range(1200))
    assert len(outcomes) == 400 and {o.request_id for o in outcomes} <= {r.request_id for r in requests}
    assert stats.written == {"request": 1200, "outcome": 400}
    assert stats.dropped == {} and stats.queued == 0
    assert stats.batches >= 1600 // 60  # written in batches, not one transaction per record
    first = next(r for r in requests if r.request_id == "chatcmpl-7")
    assert first == request(7, experiment.id)  # every field round-trips
    assert (
        writer.metrics_registry.get_sample_value("moea_request_log_written_total", {"kind": "request"})
        == 1200
    )


def test_partial_batch_is_written_after_the_flush_interval(
    registry: Registry, experiment: ExperimentView
) -> None:
    with RequestLogWriter(registry, batch_size=10_000, flush_interval_s=0.2) as writer:
        for index in range(5):
            writer.submit_request(request(index, experiment.id))
        assert writer.flush(timeout=30)  # waits for the background thread; close() has not run
        assert len(registry.experiment_requests(experiment.id)) == 5
        assert writer.stats().batches == 1


def test_close_without_start_writes_synchronously(registry: Registry, experiment: ExperimentView) -> None:
    writer = RequestLogWriter(registry, batch_size=2)
    for index in range(5):
        writer.submit_request(request(index, experiment.id))
    writer.close()
    assert len(registry.experiment_requests(experiment.id)) == 5


def test_a_full_spool_drops_are_counted_never_raised(registry: Registry, experiment: ExperimentView) -> None:
    line = len(encode("request", request(0, experiment.id)))
    writer = RequestLogWriter(registry, max_spool_bytes=10 * line + line // 2)  # not started: nothing drains
    accepted = [writer.submit_request(request(index, experiment.id)) for index in range(15)]
    assert accepted == [True] * 10 + [False] * 5
    assert writer.stats().dropped == {"request:spool_full": 5}
    dropped = writer.metrics_registry.get_sample_value(
        "moea_request_log_dropped_total", {"kind": "request", "reason": "spool_full"}
    )
    assert dropped == 5
    writer.close()
    assert len(registry.experiment_requests(experiment.id)) == 10
    assert writer.submit_outcome(outcome(1)) is False  # after close: dropped and counted, not raised
    assert writer.stats().dropped == {"request:spool_full": 5, "outcome:closed": 1}
    writer.close()  # idempotent


def test_a_record_the_database_refuses_does_not_sink_its_batch(
    registry: Registry, experiment: ExperimentView
) -> None:
    writer = RequestLogWriter(registry, batch_size=100, flush_interval_s=60.0)
    bad = request(2, experiment.id)
    bad.request_id = None  # type: ignore[assignment] - NOT NULL violation in the database
    for record in (request(0, experiment.id), request(1, experiment.id), bad, request(3, experiment.id)):
        writer.submit_request(record)
    stats = writer.close()
    ids = sorted(r.request_id for r in registry.experiment_requests(experiment.id))
    assert ids == ["chatcmpl-0", "chatcmpl-1", "chatcmpl-3"]
    assert stats.dropped == {"request:rejected": 1}
    assert stats.retries == 0  # a constraint violation is permanent: isolated at once, not retried
    assert stats.last_error and "IntegrityError" in stats.last_error


def test_writes_wait_out_a_locked_database(
    registry: Registry, experiment: ExperimentView, registry_url: str
) -> None:
    """Another process holds the SQLite write lock for a while: nothing is lost."""
    path = registry_url.removeprefix("sqlite:///")
    blocker = sqlite3.connect(path, timeout=30, isolation_level=None, check_same_thread=False)
    blocker.execute("BEGIN EXCLUSIVE")
    writer = RequestLogWriter(registry, batch_size=10, flush_interval_s=0.05).start()
    for index in range(25):
        writer.submit_request(request(index, experiment.id))
    released = threading.Timer(1.0, blocker.execute, args=("COMMIT",))
    released.start()
    stats = writer.close()
    released.join()
    blocker.close()
    assert stats.written == {"request": 25} and stats.dropped == {}
    assert len(registry.experiment_requests(experiment.id)) == 25


class FailingFirstCalls:
    """FAKE FAULT: the real registry, except that the first `failures` log_requests calls raise
    OperationalError. The registry absorbs SQLite busy errors itself, so a transient error that reaches
    the writer cannot be caused with a real database."""

    def __init__(self, registry: Registry, failures: int) -> None:
        self.registry, self.failures = registry, failures

    def log_requests(self, records: list[RequestRecord]) -> None:
        if self.failures > 0:
            self.failures -= 1
            raise OperationalError("INSERT INTO requests", {}, Exception("disk I/O error"))
        self.registry.log_requests(records)

    def record_outcomes(self, records: list[OutcomeRecord]) -> None:
        self.registry.record_outcomes(records)


def test_transient_errors_are_retried_with_backoff(
    registry: Registry, experiment: ExperimentView, tmp_path: Path
) -> None:
    flaky = FailingFirstCalls(registry, failures=2)
    writer = RequestLogWriter(flaky, tmp_path / "spool", batch_size=100, retry_backoff_s=0.01).start()
    for index in range(20):
        writer.submit_request(request(index, experiment.id))
    stats = writer.close()
    assert stats.retries == 2 and stats.dropped == {}
    assert len(registry.experiment_requests(experiment.id)) == 20  # one transaction after the retries
    assert stats.batches == 1


def test_errors_that_outlast_the_retries_keep_the_records(
    registry: Registry, experiment: ExperimentView, tmp_path: Path
) -> None:
    """The old writer gave up after a few retries; now an error that is not the record's fault is an
    outage: the batch stays spooled and is tried again until it is written, in one transaction."""
    flaky = FailingFirstCalls(registry, failures=8)
    writer = RequestLogWriter(flaky, tmp_path / "spool", retry_backoff_s=0.01, max_backoff_s=0.05)
    for index in range(4):
        writer.submit_request(request(index, experiment.id))
    stats = writer.close()
    assert stats.retries == 8 and stats.dropped == {} and stats.batches == 1
    assert len(registry.experiment_requests(experiment.id)) == 4


def test_invalid_settings_are_rejected(registry: Registry) -> None:
    with pytest.raises(ValueError, match="batch_size"):
        RequestLogWriter(registry, batch_size=0)


def test_interpreter_exit_flushes_a_writer_nobody_closed(
    registry: Registry, experiment: ExperimentView, registry_url: str, tmp_path: Path
) -> None:
    """A process that ends normally without calling close() still writes what it queued (atexit)."""
    script = f"""
import sys
from datetime import UTC, datetime
from registry.views import RequestRecord
from registry.service import Registry
from serving.request_log import RequestLogWriter
from serving.request_spool import encode

writer = RequestLogWriter(Registry({registry_url!r}, store_dir={str(tmp_path / "store")!r}),
                          batch_size=1000, flush_interval_s=3600).start()
for index in range(7):
    writer.submit_request(RequestRecord(f"exit-{{index}}", datetime.now(UTC), "summarize", 1, {experiment.id},
                                        None, False, 1.0, 1, 1, 200))
sys.exit(0)  # no close(): the partial batch would wait an hour
"""
    subprocess.run([sys.executable, "-c", script], check=True, timeout=120, cwd=Path(__file__).parents[2])
    logged = {r.request_id for r in registry.experiment_requests(experiment.id)}
    assert logged == {f"exit-{index}" for index in range(7)}
