"""The audit log: an append-only, hash-chained record of every accountable call.

Records live in one SQLite file that the gateway and the ingest service append to
(several processes on one machine): each append reads the tail and inserts the next
record inside one ``BEGIN IMMEDIATE`` transaction, which holds SQLite's write lock
across processes, so two writers never chain onto the same record; the primary key on
``sequence_number`` would refuse a fork even if they did. Each record's hash is the
SHA-256 of its deterministic protobuf serialisation with ``record_hash`` empty, and
covers the previous record's hash (see AuditRecord in face_service.proto), so an
edited or removed record breaks the chain for anyone who verifies it
(``facegrid audit verify``). Triggers refuse UPDATE and DELETE, so the gateway (or an
operator's slip) cannot change a record through SQLite either. Writes are durable
(``synchronous=FULL``) before the call's results are returned. Replicas on several
machines share a PostgreSQL server instead (facegrid.audit_postgres), chosen by
``gateway.audit_database_url``; `open_audit_log` picks the one configured.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import fcntl
import hashlib
import os
import sqlite3
import threading
import uuid
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from facegrid.audit_chain import record_digest
from facegrid.config import GatewaySettings
from facegrid.v1 import face_service_pb2

AuditRecord = face_service_pb2.AuditRecord
AuditRecordFilter = face_service_pb2.AuditRecordFilter

NAME_PREFIX = "auditRecords/"
# Records checked against their hashes when the gateway starts.
STARTUP_CHECK_RECORDS = 1000

_SCHEMA = """
CREATE TABLE IF NOT EXISTS audit_records (
    sequence_number INTEGER PRIMARY KEY,
    record_id TEXT NOT NULL UNIQUE,
    create_time_us INTEGER NOT NULL,
    principal TEXT NOT NULL,
    method TEXT NOT NULL,
    case_id TEXT NOT NULL,
    purpose INTEGER NOT NULL,
    collection TEXT NOT NULL,
    record BLOB NOT NULL,
    record_hash BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS audit_by_case ON audit_records (case_id, sequence_number);
CREATE INDEX IF NOT EXISTS audit_by_principal ON audit_records (principal, sequence_number);
CREATE TRIGGER IF NOT EXISTS audit_records_no_update BEFORE UPDATE ON audit_records
BEGIN SELECT RAISE(ABORT, 'audit records are append-only'); END;
CREATE TRIGGER IF NOT EXISTS audit_records_no_delete BEFORE DELETE ON audit_records
BEGIN SELECT RAISE(ABORT, 'audit records are append-only'); END;
"""


# Added after the first release: a log made before gets the column when opened.
_REQUEST_ID_COLUMN = "ALTER TABLE audit_records ADD COLUMN request_id TEXT NOT NULL DEFAULT ''"
_REQUEST_ID_INDEX = (
    "CREATE INDEX IF NOT EXISTS audit_by_request ON audit_records (request_id) "
    "WHERE request_id <> ''"
)
# The columns of a row, in index_columns' order.
COLUMNS = (
    "sequence_number, record_id, create_time_us, principal, method, case_id, purpose, "
    "collection, record, record_hash, request_id"
)
# What differs between two records of the same call made twice.
_PER_ATTEMPT_FIELDS = (
    "name",
    "sequence_number",
    "create_time",
    "trace_id",
    "client_address",
    "previous_record_hash",
    "record_hash",
)


class AuditChainError(RuntimeError):
    """The stored chain does not verify: a record was altered or removed."""


@dataclass(frozen=True)
class Page:
    records: list[AuditRecord]
    last_sequence: int  # of the last record returned; 0 if none
    more: bool


class AuditLog(Protocol):
    """What the services need of an audit log, whichever database holds it."""

    async def append(self, record: AuditRecord) -> AuditRecord:
        """Chain, hash and durably store a record; return it as stored. A retry of a
        successful call (see :func:`earlier_attempt`) returns the earlier record."""
        ...

    async def get(self, record_id: str) -> AuditRecord | None: ...

    async def list(self, where: AuditRecordFilter, after: int, size: int) -> Page: ...

    async def head(self) -> AuditRecord | None:
        """The newest record (the chain's head); None while the log is empty."""
        ...

    def exclusive(self, task: str) -> contextlib.AbstractAsyncContextManager[bool]:
        """Enter with True if no other writer of this log (in any process) is doing
        ``task`` now, then hold it until exit; with False, at once, if one is. What
        replicas sharing the log use so that one of them does a periodic task."""
        ...

    def close(self) -> None: ...


def open_audit_log(gateway: GatewaySettings) -> AuditLog:
    """The configured log: PostgreSQL when ``audit_database_url`` is set, else SQLite."""
    if gateway.audit_database_url:
        from facegrid.audit_postgres import PostgresAuditLog  # psycopg only when used

        return PostgresAuditLog(gateway.audit_database_url)
    return SqliteAuditLog(gateway.audit_path)


def lock_key(task: str) -> int:
    """A signed 64-bit key for ``task`` (PostgreSQL's advisory locks take a bigint)."""
    digest = hashlib.sha256(f"facegrid-task:{task}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


def check_tail(rows: Iterable[Sequence[object]]) -> None:
    """Check the newest records, given newest first as (sequence, record, hash)."""
    following: AuditRecord | None = None
    for sequence_value, blob, stored in rows:
        sequence = int(sequence_value)  # type: ignore[call-overload]
        stored_hash = bytes(stored)  # type: ignore[call-overload]
        record = AuditRecord.FromString(bytes(blob))  # type: ignore[call-overload]
        if record.sequence_number != sequence or record_digest(record) != stored_hash:
            raise AuditChainError(f"audit record {sequence} does not match its hash")
        if following is not None and (
            following.previous_record_hash != stored_hash
            or following.sequence_number != sequence + 1
        ):
            raise AuditChainError(f"the audit chain is broken after record {sequence}")
        following = record


def next_record(draft: AuditRecord, last: Sequence[object] | None) -> AuditRecord:
    """The record to store after the tail ``last`` (sequence, hash): named, chained, hashed."""
    record = AuditRecord()
    record.CopyFrom(draft)
    record.name = NAME_PREFIX + str(uuid.uuid4())
    record.sequence_number = 1 if last is None else int(last[0]) + 1  # type: ignore[call-overload]
    record.previous_record_hash = b"" if last is None else bytes(last[1])  # type: ignore[call-overload]
    record.record_hash = record_digest(record)
    return record


def insert_statement(table: str, placeholder: str) -> str:
    values = ", ".join([placeholder] * len(COLUMNS.split(",")))
    return f"INSERT INTO {table} ({COLUMNS}) VALUES ({values})"


def may_repeat(draft: AuditRecord) -> bool:
    """Whether the draft may be a retry of a call on record: successful, with a request_id."""
    return bool(draft.request_id) and draft.status_code == 0


def earlier_attempt(draft: AuditRecord, blobs: Iterable[object]) -> AuditRecord | None:
    """Among the stored records with the draft's request_id, one that this successful
    draft repeats: the same call made again (its reply lost, say) and answered the
    same; None when there is none and the draft must be stored."""
    if not may_repeat(draft):
        return None
    wanted = _without_attempt_fields(draft)
    for blob in blobs:
        stored = AuditRecord.FromString(bytes(blob))  # type: ignore[call-overload]
        if _without_attempt_fields(stored) == wanted:
            return stored
    return None


def _without_attempt_fields(record: AuditRecord) -> AuditRecord:
    copy = AuditRecord()
    copy.CopyFrom(record)
    for name in _PER_ATTEMPT_FIELDS:
        copy.ClearField(name)
    return copy


def index_columns(record: AuditRecord) -> tuple[object, ...]:
    """The row both databases store for a record: indexed columns, record, hash."""
    return (
        record.sequence_number,
        record.name.removeprefix(NAME_PREFIX),
        record.create_time.ToMicroseconds(),
        record.principal,
        record.method,
        record.context.case_id,
        int(record.context.purpose),
        record.collection,
        record.SerializeToString(deterministic=True),
        record.record_hash,
        record.request_id,
    )


def filter_clauses(
    where: AuditRecordFilter, after: int, placeholder: str
) -> tuple[list[str], list[object]]:
    """SQL conditions (and their values) of a ListAuditRecords filter, for either database."""
    clauses = [f"sequence_number > {placeholder}"]
    values: list[object] = [max(after, where.min_sequence_number - 1)]
    for column, value in (
        ("principal", where.principal),
        ("case_id", where.case_id),
        ("collection", where.collection),
        ("method", where.method),
    ):
        if value:
            clauses.append(f"{column} = {placeholder}")
            values.append(value)
    if where.purpose:
        clauses.append(f"purpose = {placeholder}")
        values.append(int(where.purpose))
    time_range = where.create_time_range
    if time_range.HasField("start_time"):
        clauses.append(f"create_time_us >= {placeholder}")
        values.append(time_range.start_time.ToMicroseconds())
    if time_range.HasField("end_time"):
        clauses.append(f"create_time_us < {placeholder}")
        values.append(time_range.end_time.ToMicroseconds())
    return clauses, values


def page_of(rows: Sequence[Sequence[object]], size: int) -> Page:
    """A page from up to ``size + 1`` rows of (sequence, record)."""
    page = rows[:size]
    return Page(
        records=[AuditRecord.FromString(bytes(blob)) for _, blob in page],  # type: ignore[call-overload]
        last_sequence=int(page[-1][0]) if page else 0,  # type: ignore[call-overload]
        more=len(rows) > size,
    )


# How long an append waits for another process's write lock before failing.
_BUSY_TIMEOUT_S = 10.0


class SqliteAuditLog:
    """Appends records in order (writers in several processes) and reads them back."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._path = path
        self._db = sqlite3.connect(
            path, check_same_thread=False, isolation_level=None, timeout=_BUSY_TIMEOUT_S
        )
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(audit_records)")}
        if "request_id" not in columns:
            self._db.execute(_REQUEST_ID_COLUMN)
        self._db.execute(_REQUEST_ID_INDEX)
        self._thread_lock = threading.Lock()
        self._append_lock = asyncio.Lock()
        check_tail(
            self._db.execute(
                "SELECT sequence_number, record, record_hash FROM audit_records "
                "ORDER BY sequence_number DESC LIMIT ?",
                (STARTUP_CHECK_RECORDS,),
            ).fetchall()
        )

    async def append(self, record: AuditRecord) -> AuditRecord:
        async with self._append_lock:
            return await asyncio.to_thread(self._append, record)

    def _append(self, draft: AuditRecord) -> AuditRecord:
        with self._thread_lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                if may_repeat(draft):
                    rows = self._db.execute(
                        "SELECT record FROM audit_records WHERE request_id = ? "
                        "ORDER BY sequence_number",
                        (draft.request_id,),
                    ).fetchall()
                    earlier = earlier_attempt(draft, (row[0] for row in rows))
                    if earlier is not None:
                        self._db.execute("ROLLBACK")
                        return earlier
                last = self._db.execute(
                    "SELECT sequence_number, record_hash FROM audit_records "
                    "ORDER BY sequence_number DESC LIMIT 1"
                ).fetchone()
                record = next_record(draft, last)
                self._db.execute(insert_statement("audit_records", "?"), index_columns(record))
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")
            return record

    async def get(self, record_id: str) -> AuditRecord | None:
        return await asyncio.to_thread(
            self._one, "SELECT record FROM audit_records WHERE record_id = ?", (record_id,)
        )

    async def head(self) -> AuditRecord | None:
        return await asyncio.to_thread(
            self._one, "SELECT record FROM audit_records ORDER BY sequence_number DESC LIMIT 1", ()
        )

    def _one(self, sql: str, values: tuple[object, ...]) -> AuditRecord | None:
        with self._thread_lock:
            row = self._db.execute(sql, values).fetchone()
        return None if row is None else AuditRecord.FromString(row[0])

    async def list(self, where: AuditRecordFilter, after: int, size: int) -> Page:
        return await asyncio.to_thread(self._list, where, after, size)

    def _list(self, where: AuditRecordFilter, after: int, size: int) -> Page:
        clauses, values = filter_clauses(where, after, "?")
        sql = (
            "SELECT sequence_number, record FROM audit_records WHERE "
            + " AND ".join(clauses)
            + " ORDER BY sequence_number LIMIT ?"
        )
        with self._thread_lock:
            rows = self._db.execute(sql, (*values, size + 1)).fetchall()
        return page_of(rows, size)

    @contextlib.asynccontextmanager
    async def exclusive(self, task: str) -> AsyncIterator[bool]:
        # Writers of one SQLite file share a machine: a lock file beside it serves.
        lock_path = self._path.with_name(
            f"{self._path.name}.{lock_key(task) & 0xFFFFFFFF:08x}.lock"
        )
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                yield False
                return
            yield True
        finally:
            os.close(fd)  # releases the lock

    def rows(self) -> builtins.list[tuple[object, ...]]:
        """Every stored row in log order, as stored (what a migration copies)."""
        with self._thread_lock:
            return list(
                self._db.execute(
                    f"SELECT {COLUMNS} FROM audit_records ORDER BY sequence_number"
                ).fetchall()
            )

    def close(self) -> None:
        with self._thread_lock:
            self._db.close()
