"""Request log and feedback outcomes: spooled to a local file first, then drained into the registry.

The gateway calls :meth:`RequestLogWriter.submit_request` / :meth:`~RequestLogWriter.submit_outcome`
on the request path. They append one line to this process's spool file (:mod:`serving.request_spool`)
and return: no database on the request path, never an exception. A daemon thread reads the spool and
writes it in batches (``registry.log_requests`` / ``registry.record_outcomes``, one transaction each).

Nothing lost:

* *Database down.* A batch that fails for any reason but a bad record stays in the spool and is tried
  again, with backoff (``retry_backoff_s`` doubling up to ``max_backoff_s``), for as long as it takes.
  The spool grows on disk meanwhile (bounded by ``max_spool_bytes``).
* *Process killed* (SIGKILL, OOM, crash). A record is in the kernel once ``submit_*`` returns, so it
  outlives the process. The next writer on the same spool directory (a restarted gateway, or another
  gateway on the host, which look every ``adopt_interval_s``) claims the dead process's file and drains
  it. Each process appends only to files it holds under an exclusive ``flock``.
* *Exactly once.* Requests are unique on (request_id, shadow) and outcomes on ``outcome_id`` (set here
  when the caller has none), and the registry inserts with ``ON CONFLICT DO NOTHING``; so a batch
  written again after a crash, or after an error whose commit had in fact happened, adds nothing.
* *fsync policy.* ``fsync_interval_s`` (default 1 s): the thread fsyncs the spool at most that often
  while it has new lines. A killed process loses nothing either way (its writes are in the page cache);
  a power cut or kernel crash can lose the last interval. ``fsync_interval_s=0`` fsyncs every record on
  the request path (a power cut loses nothing, each request pays one fsync, ~0.1-10 ms by disk).

Records are dropped, and counted, only when the spool is over ``max_spool_bytes`` (``spool_full``), the
spool cannot be written (``spool_error``: disk full, folder gone), after :meth:`~RequestLogWriter.close`
(``closed``), when the database refuses one record for good (``rejected``: a constraint or value error,
never an outage) or when a line was damaged on disk (``damaged``). The content of a request
(``--log-content``) that would make its spool line longer than ``MAX_LINE_BYTES`` (1 MiB) is dropped and
counted as ``content:too_large``; the request itself is logged. Rejected and damaged lines are copied
to ``rejected.log`` in the spool directory. A clean :meth:`~RequestLogWriter.close` drains the spool and
deletes this process's files; when the database is still down at the close timeout, they stay for the
next writer. Counts are in :meth:`RequestLogWriter.stats` and Prometheus series ``moea_request_log_*``
(written, dropped, retries; backlog gauges ``spool_rows`` and ``spool_bytes``).
"""

from __future__ import annotations

import atexit
import logging
import threading
import time
import uuid
from collections import Counter as CountDict
from dataclasses import replace
from pathlib import Path
from typing import Any, Protocol

from prometheus_client import CollectorRegistry

from .request_spool import (
    MAX_LINE_BYTES,
    SUFFIX,
    Batch,
    RecordKind,
    Segment,
    WriterMetrics,
    WriterStats,
    bind_to_registry,
    default_spool_dir,
    encode,
)

__all__ = ["RequestLogWriter", "WriterMetrics", "WriterStats", "default_spool_dir"]

logger = logging.getLogger(__name__)


def _is_permanent(error: Exception) -> bool:
    """Errors of the record itself (constraint, value, type, registry validation): trying again cannot help.
    Anything else (connection refused, file missing, busy too long) is an outage: keep and retry."""
    from sqlalchemy.exc import DataError, IntegrityError

    from registry.errors import ValidationError

    return isinstance(error, IntegrityError | DataError | ValueError | TypeError | ValidationError)


class LogRegistry(Protocol):
    """The two registry methods the writer calls (one transaction per call, idempotent)."""

    def log_requests(self, records: list[Any]) -> None: ...

    def record_outcomes(self, records: list[Any]) -> None: ...


class RequestLogWriter:
    """Spools request and outcome records, and drains the spool into the registry in batches.

    Args:
        registry: Anything with ``log_requests(list)`` and ``record_outcomes(list)``, normally
            :class:`registry.service.Registry`.
        spool_dir: Spool directory (created); default :func:`default_spool_dir` of ``registry.url``.
            Give every registry its own; gateways of one registry on one host may share it.
        batch_size: Most records per database transaction.
        flush_interval_s: Longest a record waits in a partial batch.
        fsync_interval_s: Longest spooled data waits for an fsync; 0 = fsync every record (see above).
        max_spool_bytes: Spool backlog beyond which new records are dropped (and counted).
        segment_bytes: A fully drained spool file this large is replaced by a fresh one.
        retry_backoff_s, max_backoff_s: First and longest wait between tries while the database fails.
        adopt_interval_s: How often to look for spool files of dead processes.
        metrics_registry: Prometheus registry for the ``moea_request_log_*`` series (pass the
            gateway's so ``/metrics`` shows them); a private one when None.
    """

    def __init__(  # long: one line per setting, each documented above
        self,
        registry: LogRegistry,
        spool_dir: Path | str | None = None,
        batch_size: int = 256,
        flush_interval_s: float = 1.0,
        fsync_interval_s: float = 1.0,
        max_spool_bytes: int = 1 << 30,
        segment_bytes: int = 4 << 20,
        retry_backoff_s: float = 0.1,
        max_backoff_s: float = 5.0,
        adopt_interval_s: float = 30.0,
        metrics_registry: CollectorRegistry | None = None,
    ) -> None:
        if batch_size < 1 or flush_interval_s <= 0 or fsync_interval_s < 0 or max_spool_bytes < 1:
            raise ValueError(
                "batch_size, max_spool_bytes ≥ 1, flush_interval_s > 0, fsync_interval_s ≥ 0 required"
            )
        if spool_dir is None:
            if not isinstance(getattr(registry, "url", None), str):
                raise ValueError("spool_dir is required when the registry has no `url`")
            spool_dir = default_spool_dir(registry.url)  # type: ignore[attr-defined]
        self.registry = registry
        self.spool_dir = Path(spool_dir)
        self.spool_dir.mkdir(parents=True, exist_ok=True)
        if isinstance(getattr(registry, "url", None), str):
            bind_to_registry(self.spool_dir, registry.url)  # type: ignore[attr-defined]
        self.batch_size, self.flush_interval_s = batch_size, flush_interval_s
        self.fsync_interval_s, self.max_spool_bytes, self.segment_bytes = (
            fsync_interval_s,
            max_spool_bytes,
            segment_bytes,
        )
        self.retry_backoff_s, self.max_backoff_s = retry_backoff_s, max_backoff_s
        self.adopt_interval_s = adopt_interval_s
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._segment: Segment | None = None  # this process's, appended to under _lock
        self._orphans: list[Segment] = []  # claimed from dead processes (thread only)
        self._written: CountDict[str] = CountDict()
        self._dropped: CountDict[str] = CountDict()
        self._batches = self._retries = self._adopted = 0
        self._last_error: str | None = None
        self._thread: threading.Thread | None = None
        self._closed = self._abandon = False
        self.metrics_registry = metrics_registry if metrics_registry is not None else CollectorRegistry()
        self.metrics = WriterMetrics(self.metrics_registry)
        self.metrics.spool_rows.set_function(lambda: self._backlog()[0])
        self.metrics.spool_bytes.set_function(lambda: self._backlog()[1])

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self) -> RequestLogWriter:
        """Start the background thread (idempotent); returns self."""
        with self._lock:
            if self._closed:
                raise RuntimeError("RequestLogWriter was closed; create a new one")
            if self._thread is not None:
                return self
        self._adopt()  # what a killed process left is claimed before start() returns
        with self._lock:
            if self._thread is not None:
                return self
            self._thread = threading.Thread(target=self._run, name="moea-request-log", daemon=True)
            self._thread.start()
        atexit.register(self.close)
        return self

    def close(self, timeout: float | None = 60.0) -> WriterStats:
        """Stop accepting records, drain the spool (up to `timeout`), stop the thread (idempotent).

        What the database did not take by then stays in the spool for the next writer."""
        with self._lock:
            already_closed, self._closed = self._closed, True
            thread = self._thread
            self._wake.notify_all()
        if already_closed:
            return self.stats()
        atexit.unregister(self.close)
        if thread is not None:
            thread.join(timeout)
            if thread.is_alive():
                with self._lock:
                    self._abandon = True
                    self._wake.notify_all()
                rows, size = self._backlog()
                logger.warning("request log: %d records (%d bytes) stay in the spool %s for the next gateway",
                               rows, size, self.spool_dir)  # fmt: skip
        else:
            deadline = None if timeout is None else time.monotonic() + timeout
            self._adopt()
            self._drain_loop(lambda: deadline is not None and time.monotonic() > deadline)
            self._finish()
        return self.stats()

    def __enter__(self) -> RequestLogWriter:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- request path ----------------------------------------------------------------------------

    def submit_request(self, record: Any) -> bool:
        """Spool a ``RequestRecord``; False when it was dropped. Never raises."""
        return self._submit("request", record)

    def submit_outcome(self, record: Any) -> bool:
        """Spool an ``OutcomeRecord`` (an ``outcome_id`` is given when it has none); False when dropped."""
        if getattr(record, "outcome_id", "") is None:
            record = replace(record, outcome_id=uuid.uuid4().hex)
        return self._submit("outcome", record)

    def _submit(self, kind: RecordKind, record: Any) -> bool:
        try:
            line = encode(kind, record)
            if len(line) > MAX_LINE_BYTES and getattr(record, "messages", None) is not None:
                # log the request without its content rather than a line the reader would call damaged
                line = encode(kind, replace(record, messages=None, answer=None))
                with self._lock:
                    self._count_drop("content", "too_large", 1)
            with self._lock:  # under the lock no record slips in after close
                if self._closed:
                    self._count_drop(kind, "closed", 1)
                    return False
                if self._backlog_locked()[1] + len(line) > self.max_spool_bytes:
                    self._count_drop(kind, "spool_full", 1)
                    return False
                try:
                    if self._segment is None:
                        self._segment = Segment.create(self.spool_dir)
                    self._segment.append(line)
                    if self.fsync_interval_s == 0:
                        self._segment.fsync()
                except OSError as error:
                    self._count_drop(kind, "spool_error", 1)
                    self._last_error = f"spool: {error}"
                    logger.warning("request log: cannot write the spool in %s: %s", self.spool_dir, error)
                    return False
                if self._segment.rows >= self.batch_size:
                    self._wake.notify_all()
            return True
        except Exception:  # noqa: BLE001 - the request path must never fail because of logging
            logger.exception("request log: could not spool a %s record", kind)
            return False

    def flush(self, timeout: float | None = 30.0) -> bool:
        """Block until every record spooled so far is in the database (or dropped); False on timeout.

        Meant for tests and shutdown hooks; the writer flushes on its own schedule otherwise."""
        deadline = None if timeout is None else time.monotonic() + timeout
        thread = self._thread
        if thread is None or not thread.is_alive():
            self._drain_loop(lambda: deadline is not None and time.monotonic() > deadline)
            return self._backlog()[0] == 0
        while self._backlog()[0]:
            if deadline is not None and time.monotonic() > deadline:
                return False
            with self._lock:
                self._wake.notify_all()
            time.sleep(0.02)
        return True

    def stats(self) -> WriterStats:
        """Counts of records written, dropped and waiting."""
        with self._lock:
            rows, size = self._backlog_locked()
            return WriterStats(
                queued=rows, spool_bytes=size, written=dict(self._written), dropped=dict(self._dropped),
                batches=self._batches, retries=self._retries, adopted=self._adopted, last_error=self._last_error,
            )  # fmt: skip

    def _backlog(self) -> tuple[int, int]:
        with self._lock:
            return self._backlog_locked()

    def _backlog_locked(self) -> tuple[int, int]:
        segments = [*self._orphans, *([self._segment] if self._segment is not None else [])]
        return sum(s.rows for s in segments), sum(s.backlog_bytes for s in segments)

    # -- background thread -----------------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._drain_loop(lambda: self._abandon, background=True)
        finally:
            self._finish()

    def _drain_loop(self, give_up: Any, background: bool = False) -> None:
        """Drain until the spool is empty (when closing, or in the foreground) or `give_up()`.

        The thread's main loop: a batch is written once `batch_size` records wait or `flush_interval_s`
        after the last write; while the database fails, tries are spaced by the backoff."""
        backoff = self.retry_backoff_s
        next_drain, next_adopt = 0.0, time.monotonic() + self.adopt_interval_s  # start() adopted
        next_fsync = time.monotonic() + (self.fsync_interval_s or 1.0)
        blocked = False
        while not give_up():
            now = time.monotonic()
            if background and now >= next_adopt:
                self._adopt()
                next_adopt = now + self.adopt_interval_s
            if now >= next_fsync:
                self._fsync()
                next_fsync = now + (self.fsync_interval_s or 1.0)
            if now >= next_drain or (not blocked and self._drain_due()):
                try:
                    state = self._drain_step()
                except Exception as error:  # noqa: BLE001 - a bug here must not stop logging for good
                    logger.exception("request log: unexpected error draining the spool")
                    self._note_error("request", error)
                    state = "blocked"
                blocked = state == "blocked"
                if state == "progress":
                    backoff = self.retry_backoff_s
                    continue
                if blocked:
                    with self._lock:
                        self._retries += 1
                    self.metrics.retries.inc()
                    next_drain, backoff = now + backoff, min(backoff * 2, self.max_backoff_s)
                else:
                    if self._closed or not background:
                        return
                    next_drain = now + self.flush_interval_s
            with self._lock:
                if give_up() or (not blocked and self._drain_due_locked()):
                    continue
                wake_at = min(next_drain, next_fsync, next_adopt if background else next_drain)
                self._wake.wait(max(0.0, wake_at - time.monotonic()))

    def _drain_due(self) -> bool:
        with self._lock:
            return self._drain_due_locked()

    def _drain_due_locked(self) -> bool:
        own = self._segment.rows if self._segment is not None else 0
        return self._closed or own >= self.batch_size

    def _drain_step(self) -> str:
        """Store one batch: "progress", "blocked" (the database failed; nothing consumed) or "idle"."""
        if self._orphans:
            segment = self._orphans[0]
            batch = segment.read(self.batch_size)
            if not batch.records and not batch.damaged:
                if segment.torn_tail():
                    logger.warning("request log: %d bytes of an unfinished line at the end of %s (skipped)",
                                   segment.torn_tail(), segment.path)  # fmt: skip
                    self._reject("unknown", [segment.read_tail()], "damaged", ["unfinished line"])
                with self._lock:
                    self._orphans.pop(0)
                segment.close(remove=True)
                return "progress"
            return "progress" if self._store(segment, batch) else "blocked"
        segment = self._segment
        if segment is None:
            return "idle"
        batch = segment.read(self.batch_size)
        if batch.records or batch.damaged:
            return "progress" if self._store(segment, batch) else "blocked"
        with self._lock:  # drained: start a fresh file once this one is big
            if segment.read_offset == segment.size and segment.size >= self.segment_bytes:
                self._segment = None
                segment.close(remove=True)
        return "idle"

    def _store(self, segment: Segment, batch: Batch) -> bool:
        """Write requests, then outcomes (feedback never precedes its request); advance on success."""
        for kind in ("request", "outcome"):
            items = [(record, line) for record_kind, record, line in batch.records if record_kind == kind]
            if items and not self._write_kind(kind, items):  # type: ignore[arg-type]
                return False  # read again next time: damaged lines are only counted once it passes
        if batch.damaged:
            self._reject("unknown", batch.damaged, "damaged", ["damaged spool line"] * len(batch.damaged))
        with self._lock:
            segment.read_offset = batch.end
            segment.rows -= len(batch.records) + len(batch.damaged)
        return True

    def _write_kind(self, kind: RecordKind, items: list[tuple[Any, bytes]]) -> bool:
        """One transaction for the batch; if the database refuses a record, write one by one and reject
        only the refused ones. False when the database is unavailable (nothing is dropped then)."""
        try:
            self._write(kind, [record for record, _ in items])
            self._count_written(kind, len(items))
            return True
        except Exception as error:  # noqa: BLE001 - any database error: classify it
            self._note_error(kind, error)
            if not _is_permanent(error):
                return False
        refused: list[bytes] = []
        reasons: list[str] = []
        for record, line in items:
            try:
                self._write(kind, [record])
                self._count_written(kind, 1)
            except Exception as error:  # noqa: BLE001
                self._note_error(kind, error)
                if not _is_permanent(error):
                    return False  # an outage began: the rest stays spooled (rewriting is idempotent)
                refused.append(line)
                reasons.append(self._last_error or "")
        self._reject(kind, refused, "rejected", reasons)
        return True

    def _write(self, kind: RecordKind, records: list[Any]) -> None:
        if kind == "request":
            self.registry.log_requests(records)
        else:
            self.registry.record_outcomes(records)

    def _adopt(self) -> None:
        """Claim spool files whose process is gone (their flock is free)."""
        mine = {s.path for s in [*self._orphans, self._segment] if s is not None}
        try:
            paths = sorted(self.spool_dir.glob(f"*{SUFFIX}"))
        except OSError as error:
            logger.warning("request log: cannot list the spool %s: %s", self.spool_dir, error)
            return
        for path in paths:
            if path in mine:
                continue
            segment = Segment.claim(path)
            if segment is not None:
                logger.info("request log: draining %s (%d records) of a stopped process", path, segment.rows)
                with self._lock:
                    self._orphans.append(segment)
                    self._adopted += 1

    def _fsync(self) -> None:
        with self._lock:
            segment = self._segment
        if segment is not None:
            try:
                segment.fsync()
            except OSError as error:
                logger.warning("request log: fsync of %s failed: %s", segment.path, error)

    def _finish(self) -> None:
        """Release every spool file; delete those fully in the database."""
        with self._lock:
            segments = [*self._orphans, *([self._segment] if self._segment is not None else [])]
            self._orphans, self._segment = [], None
        for segment in segments:
            segment.close(remove=segment.read_offset == segment.size)

    # -- counting --------------------------------------------------------------------------------

    def _count_written(self, kind: RecordKind, count: int) -> None:
        self.metrics.written.labels(kind).inc(count)
        with self._lock:
            self._written[kind] += count
            self._batches += 1

    def _reject(self, kind: str, lines: list[bytes], reason: str, errors: list[str]) -> None:
        """Count dropped lines and keep them in ``rejected.log`` (line, tab, error) for a person to look at."""
        if not lines:
            return
        try:
            with open(self.spool_dir / "rejected.log", "ab") as file:
                for line, error in zip(lines, errors, strict=True):
                    file.write(line + b"\t" + error.encode() + b"\n")
        except OSError as error:
            logger.warning("request log: cannot write %s: %s", self.spool_dir / "rejected.log", error)
        with self._lock:
            self._count_drop(kind, reason, len(lines))

    def _note_error(self, kind: RecordKind, error: Exception) -> None:
        message = f"{type(error).__name__}: {error}".splitlines()[0]
        logger.warning("request log: writing %s records failed: %s", kind, message)
        with self._lock:
            self._last_error = message

    def _count_drop(self, kind: str, reason: str, count: int) -> None:
        """Count dropped records (caller holds ``_lock``)."""
        self._dropped[f"{kind}:{reason}"] += count
        self.metrics.dropped.labels(kind, reason).inc(count)
