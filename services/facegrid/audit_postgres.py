"""The audit log on a PostgreSQL server: one hash chain for any number of replicas.

Every gateway and ingest replica, on any machine, appends to the same table. An append
takes a transaction-scoped advisory lock (``pg_advisory_xact_lock``), reads the tail and
inserts the next record, so appends are serialised across processes and machines: no
two chain onto the same record, and none fails for contention (measured here without
the lock: 517 of 800 concurrent appends failed on the primary key). The primary key on
``sequence_number`` would still refuse a fork if the lock were bypassed.

Append-only is enforced by the database three ways: row triggers refuse UPDATE and
DELETE, a statement trigger refuses TRUNCATE (row triggers do not fire on it), and the
role the services run as should hold only SELECT and INSERT (`grant_writer`). The
table's owner can still disable triggers; signed checkpoints of the chain's head
(facegrid.audit_checkpoint) are what make a rewrite by whoever runs the database
detectable.

The table is created when missing (under the same lock, so two replicas starting at
once do not race); a writer role without CREATE finds it made by `create_schema` run
as the owner. Connections use psycopg 3; a connection that broke is replaced on the
next call.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from typing import TypeVar

import psycopg
from psycopg import sql

from facegrid import quotas
from facegrid.audit_chain import verify_chain
from facegrid.audit_log import (
    STARTUP_CHECK_RECORDS,
    AuditRecord,
    AuditRecordFilter,
    Page,
    check_tail,
    earlier_attempt,
    filter_clauses,
    index_columns,
    insert_statement,
    lock_key,
    may_repeat,
    next_record,
    page_of,
)

log = logging.getLogger(__name__)

# The advisory lock key of the audit chain ("facegrid" in ASCII, as a signed bigint).
CHAIN_LOCK_KEY = 0x6661636567726964
TABLE = "audit_records"
CONNECT_TIMEOUT_S = 10
# A statement that waits longer than this (the lock included) fails the append.
STATEMENT_TIMEOUT_MS = 10_000

SCHEMA = f"""
CREATE TABLE IF NOT EXISTS {TABLE} (
    sequence_number BIGINT PRIMARY KEY,
    record_id TEXT NOT NULL UNIQUE,
    create_time_us BIGINT NOT NULL,
    principal TEXT NOT NULL,
    method TEXT NOT NULL,
    case_id TEXT NOT NULL,
    purpose INTEGER NOT NULL,
    collection TEXT NOT NULL,
    record BYTEA NOT NULL,
    record_hash BYTEA NOT NULL
);
CREATE INDEX IF NOT EXISTS audit_by_case ON {TABLE} (case_id, sequence_number);
CREATE INDEX IF NOT EXISTS audit_by_principal ON {TABLE} (principal, sequence_number);
ALTER TABLE {TABLE} ADD COLUMN IF NOT EXISTS request_id TEXT NOT NULL DEFAULT '';
CREATE INDEX IF NOT EXISTS audit_by_request ON {TABLE} (request_id) WHERE request_id <> '';
CREATE OR REPLACE FUNCTION facegrid_audit_refuse_change() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'audit records are append-only: % refused', TG_OP
        USING ERRCODE = 'insufficient_privilege';
END
$$;
CREATE OR REPLACE TRIGGER audit_records_no_change BEFORE UPDATE OR DELETE ON {TABLE}
    FOR EACH ROW EXECUTE FUNCTION facegrid_audit_refuse_change();
CREATE OR REPLACE TRIGGER audit_records_no_truncate BEFORE TRUNCATE ON {TABLE}
    FOR EACH STATEMENT EXECUTE FUNCTION facegrid_audit_refuse_change();
"""

T = TypeVar("T")


class AuditSchemaError(RuntimeError):
    """The table is older than this code and this role may not upgrade it."""


class AuditMigrationError(RuntimeError):
    """A migration that would not keep the chain: the source is broken or the target full."""


def connect(url: str) -> psycopg.Connection[tuple[object, ...]]:
    return psycopg.connect(
        url,
        autocommit=True,
        connect_timeout=CONNECT_TIMEOUT_S,
        options=f"-c statement_timeout={STATEMENT_TIMEOUT_MS}",
        application_name="facegrid-audit",
    )


def create_schema(connection: psycopg.Connection[tuple[object, ...]]) -> None:
    """Create the table, its indexes and triggers if missing (as a role that may)."""
    with connection.transaction():
        connection.execute("SELECT pg_advisory_xact_lock(%s)", (CHAIN_LOCK_KEY,))
        connection.execute(SCHEMA)
        connection.execute(quotas.SCHEMA)  # the gateways' shared quota counts


def grant_writer(connection: psycopg.Connection[tuple[object, ...]], role: str) -> None:
    """Let ``role`` read and append, and nothing else (run as the table's owner)."""
    name = sql.Identifier(role)
    with connection.transaction():
        connection.execute(sql.SQL("REVOKE ALL ON {} FROM {}").format(sql.Identifier(TABLE), name))
        connection.execute(
            sql.SQL("GRANT SELECT, INSERT ON {} TO {}").format(sql.Identifier(TABLE), name)
        )
        # Quota counts are counters, not records: they are updated and pruned.
        connection.execute(
            sql.SQL("GRANT SELECT, INSERT, UPDATE, DELETE ON {} TO {}").format(
                sql.Identifier(quotas.QUOTA_TABLE), name
            )
        )


def table_exists(connection: psycopg.Connection[tuple[object, ...]]) -> bool:
    row = connection.execute("SELECT to_regclass(%s) IS NOT NULL", (TABLE,)).fetchone()
    return bool(row and row[0])


def schema_is_current(connection: psycopg.Connection[tuple[object, ...]]) -> bool:
    """Whether the table has every column (request_id came after the first release)."""
    row = connection.execute(
        "SELECT count(*) FROM information_schema.columns "
        "WHERE table_name = %s AND column_name = 'request_id'",
        (TABLE,),
    ).fetchone()
    return bool(row and row[0])


class PostgresAuditLog:
    """The audit log in a PostgreSQL table; appends serialised by an advisory lock."""

    def __init__(self, url: str) -> None:
        self._url = url
        self._thread_lock = threading.Lock()
        self._append_lock = asyncio.Lock()
        self._connection: psycopg.Connection[tuple[object, ...]] | None = None
        connection = self._connect()
        if not table_exists(connection) or not schema_is_current(connection):
            try:
                create_schema(connection)
            except psycopg.errors.InsufficientPrivilege as error:
                raise AuditSchemaError(
                    f"the audit table {TABLE} needs an upgrade this role may not make: run "
                    "'facegrid audit setup-database' as its owner"
                ) from error
        check_tail(
            connection.execute(
                f"SELECT sequence_number, record, record_hash FROM {TABLE} "
                "ORDER BY sequence_number DESC LIMIT %s",
                (STARTUP_CHECK_RECORDS,),
            ).fetchall()
        )

    def _connect(self) -> psycopg.Connection[tuple[object, ...]]:
        if self._connection is None or self._connection.closed or self._connection.broken:
            self._connection = connect(self._url)
        return self._connection

    def _run(self, work: Callable[[psycopg.Connection[tuple[object, ...]]], T]) -> T:
        """Run on this log's connection; one that broke is replaced for the next call."""
        with self._thread_lock:
            connection = self._connect()
            try:
                return work(connection)
            except psycopg.OperationalError:
                if connection.broken:
                    log.warning("the audit database connection broke; reconnecting next call")
                raise

    async def append(self, record: AuditRecord) -> AuditRecord:
        async with self._append_lock:
            return await asyncio.to_thread(self._run, lambda c: _append(c, record))

    async def get(self, record_id: str) -> AuditRecord | None:
        return await asyncio.to_thread(
            self._one, f"SELECT record FROM {TABLE} WHERE record_id = %s", (record_id,)
        )

    async def head(self) -> AuditRecord | None:
        return await asyncio.to_thread(
            self._one, f"SELECT record FROM {TABLE} ORDER BY sequence_number DESC LIMIT 1", ()
        )

    def _one(self, query: str, values: tuple[object, ...]) -> AuditRecord | None:
        row = self._run(lambda c: c.execute(query, values).fetchone())
        return None if row is None else AuditRecord.FromString(bytes(row[0]))  # type: ignore[call-overload]

    async def list(self, where: AuditRecordFilter, after: int, size: int) -> Page:
        clauses, values = filter_clauses(where, after, "%s")
        query = (
            f"SELECT sequence_number, record FROM {TABLE} WHERE "
            + " AND ".join(clauses)
            + " ORDER BY sequence_number LIMIT %s"
        )
        rows = await asyncio.to_thread(
            self._run,
            lambda c: c.execute(query, (*values, size + 1)).fetchall(),
        )
        return page_of(rows, size)

    @contextlib.asynccontextmanager
    async def exclusive(self, task: str) -> AsyncIterator[bool]:
        # A session-level advisory lock on a connection of its own, held while the task
        # runs; it goes with the connection if this process dies.
        connection = await asyncio.to_thread(connect, self._url)
        try:
            row = await asyncio.to_thread(
                lambda: connection.execute(
                    "SELECT pg_try_advisory_lock(%s)", (lock_key(task),)
                ).fetchone()
            )
            yield bool(row and row[0])
        finally:
            await asyncio.to_thread(connection.close)

    def close(self) -> None:
        with self._thread_lock:
            if self._connection is not None:
                self._connection.close()


def _append(connection: psycopg.Connection[tuple[object, ...]], draft: AuditRecord) -> AuditRecord:
    with connection.transaction():
        connection.execute("SELECT pg_advisory_xact_lock(%s)", (CHAIN_LOCK_KEY,))
        if may_repeat(draft):
            rows = connection.execute(
                f"SELECT record FROM {TABLE} WHERE request_id = %s ORDER BY sequence_number",
                (draft.request_id,),
            ).fetchall()
            earlier = earlier_attempt(draft, (row[0] for row in rows))
            if earlier is not None:
                return earlier
        last = connection.execute(
            f"SELECT sequence_number, record_hash FROM {TABLE} "
            "ORDER BY sequence_number DESC LIMIT 1"
        ).fetchone()
        record = next_record(draft, last)
        connection.execute(insert_statement(TABLE, "%s"), index_columns(record))
    return record


def migrate(rows: Iterable[Sequence[object]], url: str) -> int:
    """Copy an SQLite log's rows (in log order) into an empty PostgreSQL log, verbatim.

    The records keep their names, sequence numbers and hashes, so the chain (and any
    record hash exported before) holds across the move. The source is verified first;
    the copy is one transaction under the chain's lock: all or nothing.
    """
    rows = list(rows)
    records = [AuditRecord.FromString(bytes(row[8])) for row in rows]  # type: ignore[call-overload]
    report = verify_chain(records)
    if not report.intact:
        raise AuditMigrationError(f"the source chain is broken at {report.first_break}")
    with connect(url) as connection:
        if not table_exists(connection):
            create_schema(connection)
        with connection.transaction():
            connection.execute("SELECT pg_advisory_xact_lock(%s)", (CHAIN_LOCK_KEY,))
            existing = connection.execute(f"SELECT count(*) FROM {TABLE}").fetchone()
            if existing and int(existing[0]):  # type: ignore[call-overload]
                raise AuditMigrationError(
                    f"the target already holds {existing[0]} audit records: migrate into an "
                    "empty log"
                )
            with connection.cursor() as cursor:
                cursor.executemany(
                    insert_statement(TABLE, "%s"), [index_columns(record) for record in records]
                )
    return len(records)
