"""Background writer of the request log and feedback outcomes into the registry database.

The gateway calls :meth:`RequestLogWriter.submit_request` / :meth:`~RequestLogWriter.submit_outcome`
on the request path: they only put the record on a bounded in-memory queue and never block or raise.
One daemon thread takes records off the queue and writes them in batches (``registry.log_requests``
and ``registry.record_outcomes``, one transaction each), so a request never waits for the database.

Delivery rules:

* A batch is written when it holds ``batch_size`` records or ``flush_interval_s`` after its first
  record, whichever comes first. Requests of a batch are written before its outcomes, so feedback on
  a request always follows the request into the database.
* A failing batch is retried with exponential backoff (``max_retries`` times; e.g. SQLite busy). If it
  still fails it is written record by record, so one bad record (say feedback for an unknown id) is
  dropped and counted as ``rejected`` instead of taking the batch down with it.
* Records are dropped, and counted, only when the queue is full (overload: ``queue_full``), after
  :meth:`~RequestLogWriter.close` (``closed``) or when the database refuses them (``rejected``).
* :meth:`~RequestLogWriter.close` drains the queue and writes everything: a clean shutdown loses
  nothing. It is also registered with :mod:`atexit` as a safety net.

Counts are in :meth:`RequestLogWriter.stats` and in Prometheus series (``moea_request_log_*``)
registered in the registry passed as ``metrics_registry`` (the gateway passes its own for ``/metrics``).
"""

from __future__ import annotations

import atexit
import logging
import queue
import threading
import time
from collections import Counter as CountDict
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge

__all__ = ["RequestLogWriter", "WriterMetrics", "WriterStats"]

logger = logging.getLogger(__name__)

RecordKind = Literal["request", "outcome"]


class WriterMetrics:
    """The writer's Prometheus series, registered in the given registry (e.g. the gateway's)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.written = Counter(
            "moea_request_log_written",
            "Records written to the registry database.",
            ["kind"],
            registry=registry,
        )
        self.dropped = Counter(
            "moea_request_log_dropped",
            "Records dropped: queue_full (overload), closed (after shutdown), rejected (by the database).",
            ["kind", "reason"],
            registry=registry,
        )
        self.retries = Counter(
            "moea_request_log_retries", "Batch writes retried after a database error.", registry=registry
        )
        self.queue_depth = Gauge(
            "moea_request_log_queue_depth", "Records waiting to be written.", registry=registry
        )


def _is_permanent(error: Exception) -> bool:
    """Errors that retrying cannot fix: the registry's own (validation, unknown id) and constraint ones."""
    from sqlalchemy.exc import DataError, IntegrityError

    own = type(error).__module__.split(".")[0] == "registry"
    return own or isinstance(error, IntegrityError | DataError | ValueError | TypeError)


class LogRegistry(Protocol):
    """The two registry methods the writer calls (one transaction per call)."""

    def log_requests(self, records: list[Any]) -> None: ...

    def record_outcomes(self, records: list[Any]) -> None: ...


@dataclass
class WriterStats:
    """A snapshot of what the writer has done so far."""

    queued: int = 0
    """Records waiting in the queue right now."""
    written: dict[str, int] = field(default_factory=dict)
    """kind → records written."""
    dropped: dict[str, int] = field(default_factory=dict)
    """``"<kind>:<reason>"`` → records dropped."""
    batches: int = 0
    """Database transactions that wrote a batch (one per record kind present in a batch)."""
    retries: int = 0
    last_error: str | None = None


_STOP = object()  # queue sentinel: drain what is queued, then exit


class RequestLogWriter:
    """Writes request and outcome records to the registry in the background, in batches.

    Args:
        registry: Anything with ``log_requests(list)`` and ``record_outcomes(list)``, normally
            :class:`registry.service.Registry`.
        batch_size: Most records per database transaction.
        flush_interval_s: Longest a record waits in a partial batch.
        max_queue: Queue bound; beyond it new records are dropped (and counted), never blocking.
        max_retries: Retries of a failing batch before it is written record by record.
        retry_backoff_s: First retry delay; doubles per retry.
        metrics_registry: Prometheus registry for the ``moea_request_log_*`` series (pass the
            gateway's so ``/metrics`` shows them); a private one when None.
    """

    def __init__(
        self,
        registry: LogRegistry,
        batch_size: int = 256,
        flush_interval_s: float = 1.0,
        max_queue: int = 100_000,
        max_retries: int = 5,
        retry_backoff_s: float = 0.1,
        metrics_registry: CollectorRegistry | None = None,
    ) -> None:
        if batch_size < 1 or flush_interval_s <= 0 or max_queue < 1 or max_retries < 0:
            raise ValueError(
                "batch_size, max_queue ≥ 1, flush_interval_s > 0 and max_retries ≥ 0 are required"
            )
        self.registry = registry
        self.batch_size = batch_size
        self.flush_interval_s = flush_interval_s
        self.max_retries = max_retries
        self.retry_backoff_s = retry_backoff_s
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=max_queue)
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._pending = 0  # submitted but not yet written or dropped (guarded by _lock)
        self._written: CountDict[str] = CountDict()
        self._dropped: CountDict[str] = CountDict()
        self._batches = 0
        self._retries = 0
        self._last_error: str | None = None
        self._thread: threading.Thread | None = None
        self._closed = False
        self.metrics_registry = metrics_registry if metrics_registry is not None else CollectorRegistry()
        self.metrics = WriterMetrics(self.metrics_registry)

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self) -> RequestLogWriter:
        """Start the background thread (idempotent); returns self."""
        with self._lock:
            if self._closed:
                raise RuntimeError("RequestLogWriter was closed; create a new one")
            if self._thread is not None:
                return self
            self._thread = threading.Thread(target=self._run, name="moea-request-log", daemon=True)
            self._thread.start()
        atexit.register(self.close)
        return self

    def close(self, timeout: float | None = 60.0) -> WriterStats:
        """Stop accepting records, write everything queued, stop the thread (idempotent)."""
        with self._lock:
            already_closed, self._closed = self._closed, True
            thread = self._thread
        if already_closed:
            return self.stats()
        atexit.unregister(self.close)
        if thread is not None and thread.is_alive():
            try:
                self._queue.put(_STOP, timeout=timeout)  # waits only while a full queue drains
            except queue.Full:
                logger.warning("request log: queue still full after %.0fs; stopping anyway", timeout)
            thread.join(timeout)
        if thread is None or not thread.is_alive():
            self._drain_synchronously()  # never started, or the thread ended: write the rest here
        elif self._pending:
            logger.warning("request log: %d records still unwritten after %.0fs", self._pending, timeout)
        return self.stats()

    def __enter__(self) -> RequestLogWriter:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- request path ----------------------------------------------------------------------------

    def submit_request(self, record: Any) -> bool:
        """Queue a ``RequestRecord``; False when it was dropped. Never blocks, never raises."""
        return self._submit("request", record)

    def submit_outcome(self, record: Any) -> bool:
        """Queue an ``OutcomeRecord``; False when it was dropped. Never blocks, never raises."""
        return self._submit("outcome", record)

    def _submit(self, kind: RecordKind, record: Any) -> bool:
        try:
            with self._lock:  # put_nowait never blocks; under the lock no record slips in after close
                if self._closed:
                    self._count_drop(kind, "closed", 1)
                    return False
                try:
                    self._queue.put_nowait((kind, record))
                except queue.Full:
                    self._count_drop(kind, "queue_full", 1)
                    return False
                self._pending += 1
            self.metrics.queue_depth.inc()
            return True
        except Exception:  # noqa: BLE001 - the request path must never fail because of logging
            logger.exception("request log: could not queue a %s record", kind)
            return False

    def flush(self, timeout: float | None = 30.0) -> bool:
        """Block until every record submitted so far is written or dropped; False on timeout.

        Meant for tests and shutdown hooks; the writer flushes on its own schedule otherwise.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._idle:
            while self._pending:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                if self._thread is None or not self._thread.is_alive():
                    break
                self._idle.wait(0.5 if remaining is None else min(remaining, 0.5))
        if self._pending and (self._thread is None or not self._thread.is_alive()):
            self._drain_synchronously()
        return self._pending == 0

    def stats(self) -> WriterStats:
        """Counts of records written, dropped and waiting."""
        with self._lock:
            return WriterStats(
                queued=self._pending,
                written=dict(self._written),
                dropped=dict(self._dropped),
                batches=self._batches,
                retries=self._retries,
                last_error=self._last_error,
            )

    # -- background thread -----------------------------------------------------------------------

    def _run(self) -> None:
        stopping = False
        while not stopping:
            batch, stopping = self._collect_batch()
            if batch:
                try:
                    self._write_batch(batch)
                except Exception:  # noqa: BLE001 - a bug here must not stop logging for good
                    logger.exception("request log: unexpected error writing a batch")

    def _collect_batch(self) -> tuple[list[tuple[RecordKind, Any]], bool]:
        """Wait for a first record, then gather more until full or the flush interval ends."""
        first = self._queue.get()
        if first is _STOP:
            return self._take_all_nowait(), True
        batch = [first]
        deadline = time.monotonic() + self.flush_interval_s
        while len(batch) < self.batch_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                item = self._queue.get(timeout=remaining)
            except queue.Empty:
                break
            if item is _STOP:
                return batch + self._take_all_nowait(), True
            batch.append(item)
        return batch, False

    def _take_all_nowait(self) -> list[tuple[RecordKind, Any]]:
        items = []
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return items
            if item is not _STOP:
                items.append(item)

    def _drain_synchronously(self) -> None:
        items = self._take_all_nowait()
        for start in range(0, len(items), self.batch_size):
            self._write_batch(items[start : start + self.batch_size])

    def _write_batch(self, batch: list[tuple[RecordKind, Any]]) -> None:
        """Write requests then outcomes of one batch (so feedback never precedes its request)."""
        try:
            self.metrics.queue_depth.dec(len(batch))
            for kind in ("request", "outcome"):
                records = [record for record_kind, record in batch if record_kind == kind]
                if not records:
                    continue
                written = self._write_with_retry(kind, records)
                self.metrics.written.labels(kind).inc(written)
                with self._lock:
                    self._written[kind] += written
                    self._batches += 1
                    if written < len(records):
                        self._count_drop(kind, "rejected", len(records) - written)
        finally:
            with self._lock:
                self._pending -= len(batch)
                self._idle.notify_all()

    def _write(self, kind: RecordKind, records: list[Any]) -> None:
        if kind == "request":
            self.registry.log_requests(records)
        else:
            self.registry.record_outcomes(records)

    def _write_with_retry(self, kind: RecordKind, records: list[Any]) -> int:
        """Write ``records`` in one transaction, retrying; fall back to one by one. Returns written count."""
        delay = self.retry_backoff_s
        for attempt in range(self.max_retries + 1):
            try:
                self._write(kind, records)
                return len(records)
            except Exception as error:  # noqa: BLE001 - any database error: retry, then isolate
                self._note_error(kind, error)
                if attempt == self.max_retries or _is_permanent(error):
                    break
                self.metrics.retries.inc()
                with self._lock:
                    self._retries += 1
                time.sleep(delay)
                delay *= 2
        if len(records) == 1:
            return 0
        written = 0
        for record in records:  # isolate the record(s) the database refuses
            try:
                self._write(kind, [record])
                written += 1
            except Exception as error:  # noqa: BLE001
                self._note_error(kind, error)
        return written

    def _note_error(self, kind: RecordKind, error: Exception) -> None:
        message = f"{type(error).__name__}: {error}".splitlines()[0]
        logger.warning("request log: writing %s records failed: %s", kind, message)
        with self._lock:
            self._last_error = message

    def _count_drop(self, kind: RecordKind, reason: str, count: int) -> None:
        """Count dropped records (caller holds ``_lock``)."""
        self._dropped[f"{kind}:{reason}"] += count
        self.metrics.dropped.labels(kind, reason).inc(count)
