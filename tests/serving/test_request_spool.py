"""The request log's spool under real faults: a database that is gone, a writer killed with SIGKILL.

Real SQLite files, real processes, real signals; nothing mocked. "Answered" below means the writer's
`submit_*` had returned (the gateway answers a request after that call), which a child process proves
by printing the id only then.
"""

from __future__ import annotations

import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from registry.service import Registry
from registry.views import OutcomeRecord
from serving.request_log import RequestLogWriter
from serving.request_spool import SUFFIX, decode, default_spool_dir, encode

from .test_request_log import T0, outcome, request

ROOT = Path(__file__).resolve().parents[2]

# A stand-in for the gateway's request path: spool request i (and an outcome for every third), print
# "r i" / "o i" once submit_* has returned, one per `pause`, until killed or `count` / `seconds` is reached.
CHILD = """
import sys, time
from datetime import UTC, datetime, timedelta
from registry.views import OutcomeRecord, RequestRecord
from registry.service import Registry
from serving.request_log import RequestLogWriter

url, spool, first, count = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
pause, seconds = float(sys.argv[5]), float(sys.argv[6])
registry = Registry(url, store_dir=spool + "-store")
writer = RequestLogWriter(registry, spool, batch_size=20, flush_interval_s=0.05).start()
print("ready", flush=True)
t0, end = datetime(2025, 1, 1, tzinfo=UTC), time.monotonic() + seconds
for i in range(first, first + count):
    if time.monotonic() > end:
        break
    assert writer.submit_request(RequestRecord(f"req-{i}", t0 + timedelta(milliseconds=i), "summarize", 1,
                                               None, f"user-{i % 7}", False, 1.0, 1, 1, 200))
    print("r", i, flush=True)
    if i % 3 == 0:
        assert writer.submit_outcome(OutcomeRecord(f"req-{i}", t0, reward=i / 10))
        print("o", i, flush=True)
    time.sleep(pause)
stats = writer.close(timeout=120)
print("closed", stats.queued, stats.dropped, flush=True)
"""


class Child:
    """One writer process running CHILD; `answered` collects what it printed."""

    def __init__(self, url: str, spool: Path, first: int, pause: float, seconds: float = 1e9) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", CHILD, url, str(spool), str(first), "10000000", str(pause), str(seconds)],
            stdout=subprocess.PIPE, text=True, cwd=ROOT,
        )  # fmt: skip
        self.requests: set[str] = set()
        self.outcomes: set[str] = set()
        assert self.readline() == "ready"

    def readline(self) -> str:
        line = self.proc.stdout.readline().strip()  # type: ignore[union-attr]
        if line.startswith("r "):
            self.requests.add(f"req-{line.split()[1]}")
        elif line.startswith("o "):
            self.outcomes.add(f"req-{line.split()[1]}")
        return line

    def run_until(self, answered: int) -> None:
        while len(self.requests) < answered:
            assert self.readline(), "the writer process ended early"

    def run_for(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            assert self.readline(), "the writer process ended early"

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        rest = self.proc.communicate(timeout=30)[0]
        for line in rest.splitlines():  # printed before the kill: answered too
            if line.startswith(("r ", "o ")):
                (self.requests if line[0] == "r" else self.outcomes).add(f"req-{line.split()[1]}")
        assert self.proc.returncode == -signal.SIGKILL


def logged(path: Path) -> tuple[list[str], list[str]]:
    """Every request id and every outcome's request id in the database, repeats included."""
    with sqlite3.connect(path) as connection:
        requests = [row[0] for row in connection.execute("SELECT request_id FROM requests")]
        outcomes = [row[0] for row in connection.execute("SELECT request_id FROM outcomes")]
    return requests, outcomes


def assert_exactly_once(path: Path, requests: set[str], outcomes: set[str]) -> None:
    logged_requests, logged_outcomes = logged(path)
    assert len(logged_requests) == len(set(logged_requests)), "a request is logged twice"
    assert len(logged_outcomes) == len(set(logged_outcomes)), "an outcome is logged twice"
    assert requests <= set(logged_requests), f"{len(requests - set(logged_requests))} answered requests lost"
    assert outcomes <= set(logged_outcomes), f"{len(outcomes - set(logged_outcomes))} outcomes lost"


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    path = tmp_path / "db" / "registry.db"
    Registry(f"sqlite:///{path}", tmp_path / "store").close()  # schema at head
    return path


def test_kill_9_mid_stream_then_a_new_writer_drains_the_dead_ones_spool(
    db_path: Path, tmp_path: Path
) -> None:
    url, spool = f"sqlite:///{db_path}", tmp_path / "spool"
    child = Child(url, spool, first=0, pause=0.001)
    child.run_until(answered=600)  # batches of 20 every 50 ms: the database is being written meanwhile
    child.kill()
    before, _ = logged(db_path)
    assert 0 < len(before) <= len(child.requests)  # killed mid-stream (the drain is usually a batch behind)
    assert len(list(spool.glob(f"*{SUFFIX}"))) == 1  # the dead process's file, now unlocked

    registry = Registry(url, tmp_path / "store")
    writer = RequestLogWriter(registry, spool, flush_interval_s=0.05).start()
    assert writer.stats().adopted == 1
    stats = writer.close()
    registry.close()
    assert_exactly_once(db_path, child.requests, child.outcomes)
    # The file held rows the dead writer had already stored; they went in again and were skipped.
    assert stats.written["request"] > len(logged(db_path)[0]) - len(before)
    assert stats.dropped == {} and list(spool.glob(f"*{SUFFIX}")) == []


def test_database_gone_then_back_nothing_lost(db_path: Path, tmp_path: Path) -> None:
    """The database's folder disappears (moved away, connections dropped) for longer than the old writer
    retried (~3 s); records wait in the spool, the backlog shows in the gauges, and all arrive later."""
    registry = Registry(f"sqlite:///{db_path}", tmp_path / "store")
    writer = RequestLogWriter(registry, tmp_path / "spool", batch_size=10, flush_interval_s=0.05,
                              retry_backoff_s=0.05, max_backoff_s=0.5).start()  # fmt: skip
    for index in range(20):
        writer.submit_request(request(index, None))
    assert writer.flush(timeout=30)

    away = db_path.parent.with_name("db-away")
    db_path.parent.rename(away)
    registry.engine.dispose()  # like a database server restart: pooled connections are gone
    for index in range(20, 120):
        writer.submit_request(request(index, None))
        if index % 2:
            writer.submit_outcome(outcome(index))
    time.sleep(4.0)
    stats = writer.stats()
    assert stats.queued == 150 and stats.dropped == {} and stats.retries >= 3
    assert "unable to open database file" in (stats.last_error or "")
    rows = writer.metrics_registry.get_sample_value("moea_request_log_spool_rows")
    assert rows == 150 and writer.metrics_registry.get_sample_value("moea_request_log_spool_bytes") > 0

    away.rename(db_path.parent)
    assert writer.flush(timeout=30)
    stats = writer.close()
    registry.close()
    assert stats.dropped == {} and stats.queued == 0
    assert writer.metrics_registry.get_sample_value("moea_request_log_spool_rows") == 0
    assert_exactly_once(
        db_path, {f"chatcmpl-{i}" for i in range(120)}, {f"chatcmpl-{i}" for i in range(21, 120, 2)}
    )


@pytest.mark.slow
def test_a_minute_long_outage_and_a_kill_9_lose_nothing(db_path: Path, tmp_path: Path) -> None:
    """Slow (~70 s: the outage lasts the full minute). Another connection holds SQLite's write lock
    (BEGIN EXCLUSIVE) for 60 s. Meanwhile writer A answers requests and is killed with SIGKILL 20 s in;
    writer B starts on the same spool, answers more, and closes after the lock is released."""
    url, spool = f"sqlite:///{db_path}", tmp_path / "spool"
    blocker = sqlite3.connect(db_path, isolation_level=None)
    blocker.execute("BEGIN EXCLUSIVE")
    locked_at = time.monotonic()
    a = Child(url, spool, first=0, pause=0.01)
    a.run_for(20.0)
    a.kill()
    outage_left = 60.0 - (time.monotonic() - locked_at)
    b = Child(url, spool, first=1_000_000, pause=0.01, seconds=outage_left + 3.0)  # then B closes
    b.run_for(outage_left)
    assert logged(db_path) == ([], [])  # reads still work: nothing reached the database in the outage
    blocker.execute("COMMIT")
    blocker.close()
    while (line := b.readline()) and not line.startswith("closed"):
        pass
    assert line == "closed 0 {}", line  # B drained everything, its own and A's, and dropped nothing
    assert b.proc.wait(timeout=60) == 0
    assert len(a.requests) > 1000 and len(b.requests) > 1000
    assert_exactly_once(db_path, a.requests | b.requests, a.outcomes | b.outcomes)
    assert list(spool.glob(f"*{SUFFIX}")) == []


def test_writers_sharing_a_spool_dir_keep_to_their_own_files(db_path: Path, tmp_path: Path) -> None:
    registry = Registry(f"sqlite:///{db_path}", tmp_path / "store")
    first = RequestLogWriter(registry, tmp_path / "spool", flush_interval_s=0.05).start()
    first.submit_request(request(0, None))  # first's file exists (and is locked) before second starts
    second = RequestLogWriter(registry, tmp_path / "spool", flush_interval_s=0.05).start()
    for index in range(1, 200):
        (first if index % 2 else second).submit_request(request(index, None))
    assert second.stats().adopted == 0 and first.stats().adopted == 0
    assert len(list((tmp_path / "spool").glob(f"*{SUFFIX}"))) == 2
    first.close(), second.close()
    registry.close()
    assert_exactly_once(db_path, {f"chatcmpl-{i}" for i in range(200)}, set())
    assert list((tmp_path / "spool").glob(f"*{SUFFIX}")) == []


def test_damaged_lines_and_an_unfinished_last_line_are_skipped_and_kept(
    db_path: Path, tmp_path: Path
) -> None:
    spool = tmp_path / "spool"
    spool.mkdir()
    good = [encode("request", request(index, None)) for index in range(3)]
    flipped = bytearray(good[1])
    flipped[20] ^= 1  # one bit of the JSON: the checksum no longer matches
    (spool / f"1-99999-dead{SUFFIX}").write_bytes(good[0] + bytes(flipped) + good[2] + good[2][:30])
    registry = Registry(f"sqlite:///{db_path}", tmp_path / "store")
    stats = RequestLogWriter(registry, spool).start().close()
    registry.close()
    assert sorted(logged(db_path)[0]) == ["chatcmpl-0", "chatcmpl-2"]
    assert stats.adopted == 1 and stats.dropped == {"unknown:damaged": 2}
    kept = (spool / "rejected.log").read_bytes()
    assert bytes(flipped).rstrip(b"\n") in kept and good[2][:30] in kept
    assert list(spool.glob(f"*{SUFFIX}")) == []


def test_drained_spool_files_are_replaced_so_the_spool_stays_small(db_path: Path, tmp_path: Path) -> None:
    registry = Registry(f"sqlite:///{db_path}", tmp_path / "store")
    writer = RequestLogWriter(registry, tmp_path / "spool", flush_interval_s=0.02, segment_bytes=2000).start()
    files: set[str] = set()
    for index in range(300):
        writer.submit_request(request(index, None))
        files |= {path.name for path in (tmp_path / "spool").glob(f"*{SUFFIX}")}
        if index % 25 == 0:
            assert writer.flush(timeout=30)
    writer.close()
    registry.close()
    assert len(files) > 3 and list((tmp_path / "spool").glob(f"*{SUFFIX}")) == []
    assert_exactly_once(db_path, {f"chatcmpl-{i}" for i in range(300)}, set())


def test_spool_lines_round_trip() -> None:
    record = OutcomeRecord("chatcmpl-1", T0, reward=0.5, thumbs=True, outcome_id="abc")
    line = encode("outcome", record)
    assert line.endswith(b"\n") and decode(line[:-1]) == ("outcome", record)
    assert decode(b"00000000 {}") is None and decode(b"garbage") is None
    assert decode(encode("request", request(3, 7))[:-1]) == ("request", request(3, 7))


def test_default_spool_dir_is_per_registry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MOEA_HOME", str(tmp_path / "home"))
    assert default_spool_dir(f"sqlite:///{tmp_path}/a/registry.db") == tmp_path / "a" / "registry.db.spool"
    one = default_spool_dir("postgresql://db-host/moea")
    assert one.parent == tmp_path / "home" / "spool" and one != default_spool_dir(
        "postgresql://db-host/other"
    )


def test_a_spool_dir_serves_one_registry(tmp_path: Path) -> None:
    one, other = (
        Registry(f"sqlite:///{tmp_path / name}.db", tmp_path / "store") for name in ("one", "other")
    )
    RequestLogWriter(one, tmp_path / "spool").close()
    RequestLogWriter(
        Registry(f"sqlite:///{tmp_path}/./one.db", tmp_path / "store"), tmp_path / "spool"
    ).close()
    with pytest.raises(ValueError, match="another registry .* own --spool-dir"):
        RequestLogWriter(other, tmp_path / "spool")


def test_an_unwritable_spool_drops_and_counts_never_raises(db_path: Path, tmp_path: Path) -> None:
    registry = Registry(f"sqlite:///{db_path}", tmp_path / "store")
    writer = RequestLogWriter(registry, tmp_path / "spool")
    shutil.rmtree(tmp_path / "spool")  # the folder vanished before the first record
    assert writer.submit_request(request(0, None)) is False
    assert writer.stats().dropped == {"request:spool_error": 1}
    os.makedirs(tmp_path / "spool")
    assert writer.submit_request(request(1, None)) is True
    writer.close()
    registry.close()
    assert logged(db_path)[0] == ["chatcmpl-1"]
