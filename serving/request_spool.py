"""Append-only spool files of the request log (used by :mod:`serving.request_log`).

A spool directory holds *segments*, files named ``<time_ns>-<pid>-<random>.spool``. Each is held open
by exactly one process under an exclusive ``flock``: the writer that created it, or, once that process
is gone (the kernel drops the lock at exit, also on SIGKILL), the first writer that *claims* it to drain
it. So any number of gateways can share one spool directory on one host without touching each other's
files. Flock needs a local file system (not NFS).

One line per record: ``<crc32 as 8 hex digits> <json>\\n`` with json ``{"k": "request"|"outcome",
"r": {field: value}}``. A line without its newline (the writer died inside the write) or whose checksum
does not match is skipped and counted, never guessed at.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import time
import uuid
import zlib
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

from prometheus_client import CollectorRegistry, Counter, Gauge

from registry.local import moea_home
from registry.views import CONTENT_FIELDS, OutcomeRecord, RequestRecord

__all__ = [
    "MAX_LINE_BYTES",
    "SUFFIX",
    "Segment",
    "WriterMetrics",
    "WriterStats",
    "bind_to_registry",
    "decode",
    "default_spool_dir",
    "encode",
]

SUFFIX = ".spool"
READ_CHUNK = 1 << 20
MAX_LINE_BYTES = READ_CHUNK
"""Longest spool line the reader takes (a longer one reads as damaged): the writer spools a request whose
logged content would make it longer without the content."""
RecordKind = Literal["request", "outcome"]
_TYPES: dict[str, type] = {"request": RequestRecord, "outcome": OutcomeRecord}


def _sqlite_file(registry_url: str) -> tuple[Any, Path | None]:
    """(parsed URL, the SQLite database file or None: not SQLite, or in memory)."""
    from sqlalchemy.engine import make_url

    parsed = make_url(registry_url)
    database = parsed.database or ""
    if parsed.get_backend_name() != "sqlite" or database in ("", ":memory:") or "mode=memory" in database:
        return parsed, None
    return parsed, Path(database.removeprefix("file:").partition("?")[0]).expanduser().resolve()


def default_spool_dir(registry_url: str) -> Path:
    """The spool directory of a registry: ``<db file>.spool`` beside a SQLite file, else
    ``$MOEA_HOME/spool/<hash of the registry>``."""
    _, path = _sqlite_file(registry_url)
    if path is not None:
        return path.with_name(path.name + ".spool")
    return moea_home() / "spool" / hashlib.sha256(registry_key(registry_url).encode()).hexdigest()[:16]


def registry_key(registry_url: str) -> str:
    """What identifies a registry's database in a URL: backend, host, port, database (SQLite: the
    resolved file); no user or password."""
    parsed, path = _sqlite_file(registry_url)
    database = str(path) if path is not None else parsed.database or ""
    return f"{parsed.get_backend_name()}://{parsed.host or ''}:{parsed.port or ''}/{database}"


def bind_to_registry(directory: Path, registry_url: str) -> None:
    """Mark `directory` as the spool of this registry (file REGISTRY); refuse one of another registry,
    whose records would otherwise be drained into the wrong database."""
    key = registry_key(registry_url)
    marker = directory / "REGISTRY"
    try:
        with open(marker, "x", encoding="utf-8") as file:
            file.write(key + "\n")
        return
    except FileExistsError:
        found = marker.read_text(encoding="utf-8").strip()
    if found != key:
        raise ValueError(
            f"spool folder {directory} holds the request log of another registry ({found}, not {key}): "
            "give each registry its own --spool-dir"
        )


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
            "Records dropped: spool_full, spool_error, closed, rejected (by the database), damaged.",
            ["kind", "reason"],
            registry=registry,
        )
        self.retries = Counter(
            "moea_request_log_retries", "Batch writes retried after a database error.", registry=registry
        )
        self.spool_rows = Gauge(
            "moea_request_log_spool_rows", "Spooled records not yet in the database.", registry=registry
        )
        self.spool_bytes = Gauge(
            "moea_request_log_spool_bytes", "Bytes of spool not yet in the database.", registry=registry
        )


@dataclass
class WriterStats:
    """A snapshot of what the writer has done so far."""

    queued: int = 0
    """Spooled records not yet in the database (this process's and claimed ones)."""
    spool_bytes: int = 0
    written: dict[str, int] = field(default_factory=dict)
    """kind → records written (a record a crash made this writer send twice counts twice)."""
    dropped: dict[str, int] = field(default_factory=dict)
    """``"<kind>:<reason>"`` → records dropped."""
    batches: int = 0
    """Database transactions that wrote a batch (one per record kind present in a batch)."""
    retries: int = 0
    adopted: int = 0
    """Spool files of dead processes this writer claimed."""
    last_error: str | None = None


def encode(kind: RecordKind, record: Any) -> bytes:
    """One spool line for a RequestRecord/OutcomeRecord."""
    # the records' fields are flat (content: plain JSON values): no deep copy (asdict) needed; no content
    # logged → no content keys, so the lines stay as they were without `--log-content`
    fields = {k: v for k, v in record.__dict__.items() if v is not None or k not in CONTENT_FIELDS}
    fields["created_at"] = record.created_at.isoformat()
    payload = json.dumps({"k": kind, "r": fields}, separators=(",", ":")).encode()
    return b"%08x %s\n" % (zlib.crc32(payload), payload)


def decode(line: bytes) -> tuple[RecordKind, Any] | None:
    """(kind, record) of one spool line without its newline; None when it is damaged."""
    crc, _, payload = line.partition(b" ")
    try:
        if len(crc) != 8 or int(crc, 16) != zlib.crc32(payload):
            return None
        data = json.loads(payload)
        fields = dict(data["r"])
        fields["created_at"] = datetime.fromisoformat(fields["created_at"])
        return data["k"], _TYPES[data["k"]](**fields)
    except (ValueError, KeyError, TypeError):
        return None


@dataclass
class Batch:
    """Records read from a segment, and where reading stopped."""

    records: list[tuple[RecordKind, Any, bytes]]
    """(kind, record, the line as spooled)."""
    end: int
    """Offset just after the last line read: the segment's next read_offset once these are stored."""
    damaged: list[bytes]
    """Lines whose checksum or JSON is wrong (skipped)."""


class Segment:
    """One spool file, exclusively flocked by this process for as long as it is open."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path, self.fd = path, fd
        self.size = os.fstat(fd).st_size  # append offset (only this process appends)
        self.read_offset = 0  # everything before it is in the database
        self.synced = self.size
        self.rows = 0  # lines after read_offset (known for own segments; counted when claimed)

    @classmethod
    def create(cls, directory: Path) -> Segment:
        """A new, empty segment of this process."""
        path = directory / f"{time.time_ns()}-{os.getpid()}-{uuid.uuid4().hex[:8]}{SUFFIX}"
        fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_EXCL, 0o644)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a fresh name: nobody else has it
        _fsync_dir(directory)  # the file itself survives a power cut, not only its data
        return cls(path, fd)

    @classmethod
    def claim(cls, path: Path) -> Segment | None:
        """Take over the segment of a process that is gone; None while its owner (or a peer) holds it."""
        try:
            fd = os.open(path, os.O_RDWR | os.O_APPEND)
        except FileNotFoundError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if os.fstat(fd).st_ino != os.stat(path).st_ino:  # drained and removed meanwhile
                raise FileNotFoundError(path)
        except (BlockingIOError, FileNotFoundError):
            os.close(fd)
            return None
        segment = cls(path, fd)
        segment.rows = segment.count_lines()
        return segment

    def append(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            written = os.write(self.fd, view)
            view = view[written:]
        self.size += len(data)
        self.rows += 1

    def fsync(self) -> None:
        if self.synced != self.size:
            size = self.size
            os.fsync(self.fd)
            self.synced = size

    @property
    def backlog_bytes(self) -> int:
        return self.size - self.read_offset

    def count_lines(self) -> int:
        count, offset = 0, self.read_offset
        while chunk := os.pread(self.fd, READ_CHUNK, offset):
            count += chunk.count(b"\n")
            offset += len(chunk)
        return count

    def read(self, max_records: int) -> Batch:
        """Up to `max_records` complete lines after read_offset (a partial last line is left alone)."""
        records: list[tuple[RecordKind, Any, bytes]] = []
        damaged: list[bytes] = []
        offset = self.read_offset
        while len(records) < max_records and offset < self.size:
            chunk = os.pread(self.fd, min(READ_CHUNK, self.size - offset), offset)
            complete = chunk.rfind(b"\n") + 1
            if not complete:
                if len(chunk) == READ_CHUNK:  # one line longer than a chunk: never written by us
                    damaged.append(chunk)
                    offset += len(chunk)
                    continue
                break
            for line in chunk[:complete].split(b"\n")[:-1]:
                offset += len(line) + 1
                decoded = decode(line)
                if decoded is None:
                    damaged.append(line)
                else:
                    records.append((*decoded, line))
                if len(records) >= max_records:
                    break
        return Batch(records, offset, damaged)

    def torn_tail(self) -> int:
        """Bytes after the last complete line (a write the owner did not finish), once all are read."""
        return self.size - self.read_offset

    def read_tail(self) -> bytes:
        return os.pread(self.fd, self.size - self.read_offset, self.read_offset)

    def close(self, remove: bool = False) -> None:
        """Release the lock; `remove` deletes the file first (only once everything is in the database)."""
        if self.fd < 0:
            return
        if remove:
            self.path.unlink(missing_ok=True)
        os.close(self.fd)
        self.fd = -1


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
