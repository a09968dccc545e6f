"""The audit log on a real PostgreSQL server: one chain for many writers, append-only
enforced by the database, signed checkpoints that catch a rewrite by the database's
owner, and a migration from SQLite that keeps the chain."""

from __future__ import annotations

import asyncio
import itertools
import multiprocessing
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from facegrid import audit_checkpoint
from facegrid.audit_chain import record_digest, verify_chain
from facegrid.audit_log import AuditChainError, SqliteAuditLog, index_columns, next_record
from facegrid.audit_postgres import (
    AuditMigrationError,
    AuditSchemaError,
    PostgresAuditLog,
    create_schema,
    migrate,
)
from facegrid.v1 import face_service_pb2

from tests.e2e.audit_helpers import append, attempt, draft, retried_call_cases
from tests.e2e.postgres_server import PostgresServer, find_bindir

pytestmark = pytest.mark.skipif(
    find_bindir() is None, reason="no PostgreSQL server (apt-get install postgresql)"
)

AuditRecord = face_service_pb2.AuditRecord
_databases = itertools.count(1)


@pytest.fixture(scope="module")
def server() -> Iterator[PostgresServer]:
    with PostgresServer() as running:
        yield running


@pytest.fixture
def url(server: PostgresServer) -> str:
    """A fresh database on the shared server, for one test."""
    name = f"audit_{next(_databases)}"
    with psycopg.connect(server.url, autocommit=True) as admin:
        admin.execute(f"CREATE DATABASE {name}")
    return server.url.rsplit("/", 1)[0] + "/" + name


def _all(log: Any) -> list[AuditRecord]:
    page = asyncio.run(log.list(face_service_pb2.AuditRecordFilter(), 0, 10_000))
    return list(page.records)


def test_records_are_chained_read_back_and_continued_after_a_reopen(url: str) -> None:
    log = PostgresAuditLog(url)
    records = append(log, 5)
    assert [r.sequence_number for r in records] == [1, 2, 3, 4, 5]
    for before, after in itertools.pairwise(records):
        assert after.previous_record_hash == before.record_hash
    assert all(record_digest(r) == r.record_hash for r in records)
    page = asyncio.run(log.list(face_service_pb2.AuditRecordFilter(case_id="C-1"), 2, 2))
    assert [r.sequence_number for r in page.records] == [3, 4]
    assert page.more
    assert (
        asyncio.run(log.list(face_service_pb2.AuditRecordFilter(case_id="other"), 0, 9)).records
        == []
    )
    assert asyncio.run(log.get(records[2].name.split("/")[1])) == records[2]
    assert asyncio.run(log.get("no-such-record")) is None
    assert asyncio.run(log.head()) == records[-1]
    log.close()
    reopened = PostgresAuditLog(url)
    assert append(reopened, 1)[0].sequence_number == 6
    assert verify_chain(_all(reopened)).intact
    reopened.close()


def _write_from_another_process(url: str, count: int, case_id: str, go: Any) -> None:
    log = PostgresAuditLog(url)
    go.wait(60)  # a Barrier: all begin together
    append(log, count, case_id)
    log.close()


def test_four_writing_processes_never_fork_the_chain_and_never_fail(url: str) -> None:
    """Replicas on any number of machines append to one chain: four processes appending
    at once all succeed, and the chain stays one line."""
    PostgresAuditLog(url).close()
    spawn = multiprocessing.get_context("spawn")
    go = spawn.Barrier(4)
    writers = [
        spawn.Process(target=_write_from_another_process, args=(url, 100, f"C-{n}", go))
        for n in range(4)
    ]
    for writer in writers:
        writer.start()
    for writer in writers:
        writer.join(timeout=120)
        assert writer.exitcode == 0  # no append failed
    log = PostgresAuditLog(url)
    records = _all(log)
    log.close()
    assert [r.sequence_number for r in records] == list(range(1, 401))
    assert verify_chain(records).intact
    assert {r.context.case_id for r in records} == {"C-0", "C-1", "C-2", "C-3"}


def test_the_database_refuses_to_change_records(url: str, server: PostgresServer) -> None:
    log = PostgresAuditLog(url)
    append(log, 3)
    log.close()
    with psycopg.connect(url, autocommit=True) as owner:
        for statement in (
            "UPDATE audit_records SET principal = 'someone else'",
            "DELETE FROM audit_records WHERE sequence_number = 2",
            "TRUNCATE audit_records",
        ):
            with pytest.raises(psycopg.errors.InsufficientPrivilege, match="append-only"):
                owner.execute(statement)
        # A writer role may read and append, and has no grant to change anything.
        owner.execute("CREATE ROLE audit_writer LOGIN")
    cli = Path(sys.executable).with_name("facegrid")
    setup = subprocess.run(
        [str(cli), "audit", "setup-database", url, "--writer-role", "audit_writer"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert setup.returncode == 0, setup.stderr
    assert "audit_writer may only read and append" in setup.stdout
    writer_url = url.replace("facegrid@", "audit_writer@")
    writer_log = PostgresAuditLog(writer_url)  # finds the table; creates nothing
    assert append(writer_log, 1)[0].sequence_number == 4
    writer_log.close()
    with psycopg.connect(writer_url, autocommit=True) as writer:
        for statement in (
            "UPDATE audit_records SET principal = 'x'",
            "DELETE FROM audit_records",
            "TRUNCATE audit_records",
            "ALTER TABLE audit_records DISABLE TRIGGER ALL",
        ):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                writer.execute(statement)
    with psycopg.connect(url) as check:
        row = check.execute("SELECT count(*) FROM audit_records").fetchone()
    assert row is not None
    assert row[0] == 4


def _rewrite_from(url: str, sequence: int, principal: str) -> None:
    """What the database's owner could do: disable the triggers, change a record and
    re-chain every record after it, so that the chain verifies again."""
    with psycopg.connect(url) as owner:
        owner.execute("ALTER TABLE audit_records DISABLE TRIGGER audit_records_no_change")
        rows = owner.execute(
            "SELECT sequence_number, record FROM audit_records WHERE sequence_number >= %s "
            "ORDER BY sequence_number",
            (sequence,),
        ).fetchall()
        previous = owner.execute(
            "SELECT record_hash FROM audit_records WHERE sequence_number = %s", (sequence - 1,)
        ).fetchone()
        previous_hash = bytes(previous[0]) if previous else b""
        for number, blob in rows:
            record = AuditRecord.FromString(bytes(blob))
            if number == sequence:
                record.principal = principal
            record.previous_record_hash = previous_hash
            record.record_hash = record_digest(record)
            owner.execute(
                "UPDATE audit_records SET record = %s, record_hash = %s, principal = %s "
                "WHERE sequence_number = %s",
                (
                    record.SerializeToString(deterministic=True),
                    record.record_hash,
                    record.principal,
                    number,
                ),
            )
            previous_hash = record.record_hash
        owner.execute("ALTER TABLE audit_records ENABLE TRIGGER audit_records_no_change")


def test_a_signed_checkpoint_catches_a_rewrite_by_the_databases_owner(url: str) -> None:
    log = PostgresAuditLog(url)
    append(log, 6)
    head = asyncio.run(log.head())
    assert head is not None
    key = Ed25519PrivateKey.generate()
    note = audit_checkpoint.sign(
        audit_checkpoint.Checkpoint(head.sequence_number, head.record_hash, datetime.now(UTC)),
        key,
    )
    checkpoint = audit_checkpoint.verify(note, key.public_key())
    assert (checkpoint.sequence_number, checkpoint.record_hash) == (6, head.record_hash)
    anchors = {checkpoint.sequence_number: checkpoint.record_hash}
    assert verify_chain(_all(log), anchors=anchors).intact
    log.close()

    _rewrite_from(url, 3, "someone else")
    rewritten = PostgresAuditLog(url)  # the chain alone verifies again...
    records = _all(rewritten)
    rewritten.close()
    assert records[2].principal == "someone else"
    assert verify_chain(records).intact
    report = verify_chain(records, anchors=anchors)  # ...the checkpoint does not
    assert not report.intact
    assert report.first_break is not None
    assert report.first_break.sequence_number == 6

    # A checkpoint cannot be forged or altered without the key.
    other = Ed25519PrivateKey.generate()
    with pytest.raises(audit_checkpoint.CheckpointError):
        audit_checkpoint.verify(note, other.public_key())
    altered = note.replace("\n6\n", "\n7\n", 1)
    with pytest.raises(audit_checkpoint.CheckpointError):
        audit_checkpoint.verify(altered, key.public_key())


def test_a_tampered_tail_stops_the_log_from_opening(url: str) -> None:
    log = PostgresAuditLog(url)
    append(log, 3)
    log.close()
    with psycopg.connect(url) as owner:
        owner.execute("ALTER TABLE audit_records DISABLE TRIGGER audit_records_no_change")
        owner.execute(
            "UPDATE audit_records SET record_hash = %s WHERE sequence_number = 2", (b"x" * 32,)
        )
    with pytest.raises(AuditChainError):
        PostgresAuditLog(url)


def test_migration_from_sqlite_keeps_the_chain(tmp_path: Path, url: str) -> None:
    sqlite = SqliteAuditLog(tmp_path / "audit.db")
    before = append(sqlite, 10)
    sqlite.close()
    cli = Path(sys.executable).with_name("facegrid")
    migrated = subprocess.run(
        [str(cli), "audit", "migrate", "--from", str(tmp_path / "audit.db"), "--to", url],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert migrated.returncode == 0, migrated.stderr
    assert "migrated 10 audit records" in migrated.stdout
    log = PostgresAuditLog(url)
    assert _all(log) == before  # names, sequence numbers and hashes as they were
    after = append(log, 1)[0]
    assert after.sequence_number == 11
    assert after.previous_record_hash == before[-1].record_hash
    assert verify_chain(_all(log)).intact
    log.close()
    # Into a log that already holds records: refused, nothing written.
    sqlite = SqliteAuditLog(tmp_path / "audit.db")
    with pytest.raises(AuditMigrationError, match="already holds 11"):
        migrate(sqlite.rows(), url)
    sqlite.close()
    again = subprocess.run(
        [str(cli), "audit", "migrate", "--from", str(tmp_path / "audit.db"), "--to", url],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert again.returncode == 1
    assert "already holds" in again.stderr + again.stdout


def test_a_broken_source_is_not_migrated(tmp_path: Path, url: str) -> None:
    sqlite = SqliteAuditLog(tmp_path / "audit.db")
    append(sqlite, 4)
    rows = sqlite.rows()
    sqlite.close()
    broken = [row for row in rows if row[0] != 3]  # record 3 removed
    with pytest.raises(AuditMigrationError, match="broken"):
        migrate(broken, url)
    with psycopg.connect(url) as check:
        exists = check.execute("SELECT to_regclass('audit_records') IS NOT NULL").fetchone()
        if exists and exists[0]:
            count = check.execute("SELECT count(*) FROM audit_records").fetchone()
            assert count is not None
            assert count[0] == 0


def test_schema_creation_is_safe_to_repeat(url: str) -> None:
    with psycopg.connect(url, autocommit=True) as owner:
        create_schema(owner)
        create_schema(owner)
    log = PostgresAuditLog(url)
    assert append(log, 1)[0].sequence_number == 1
    log.close()


def test_two_gateway_replicas_append_to_one_chain(
    url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Two gateways (no other service is needed for the audit log's own methods) on one
    PostgreSQL log: calls through either are recorded in one chain, which verifies
    through either, with a checkpoint signed by the replicas' shared key."""
    from facegrid.auth import ALL_SCOPES, create_token
    from facegrid.cli import main
    from facegrid_harness.launcher import ServiceGroup

    credentials = tmp_path / "credentials.json"
    token = create_token(credentials, "auditor", ALL_SCOPES)
    group = ServiceGroup(
        [
            f"gateway.credentials_file={credentials}",
            f"gateway.audit_database_url={url}",
            f"gateway.audit_path={tmp_path / 'unused.db'}",
            f"gateway.audit_signing_key_file={tmp_path / 'signing.key'}",
        ],
        log_dir=tmp_path / "logs",
    )

    def cli(address: str, *args: str) -> tuple[int, str]:
        capsys.readouterr()
        code = main([*args, "--address", address, "--token", token])
        out, err = capsys.readouterr()
        return code, out + err

    try:
        first = group.start("gateway", port=0).address
        second = group.start("gateway", port=0, instance="gateway-2").address
        for _ in range(3):
            for address in (first, second):
                assert cli(address, "audit", "list", "--limit", "1")[0] == 0
        note = tmp_path / "checkpoint.txt"
        assert cli(second, "audit", "checkpoint", "--out", str(note))[0] == 0
        public_key = tmp_path / "signing.key.pub"
        code, out = cli(
            first, "audit", "verify", "--checkpoint", str(note), "--public-key", str(public_key)
        )
        assert code == 0, out
        assert "audit log intact" in out
    finally:
        group.stop()
    assert not (tmp_path / "unused.db").exists()  # SQLite was not used
    log = PostgresAuditLog(url)
    records = _all(log)
    log.close()
    assert verify_chain(records).intact
    methods = [r.method.rsplit("/", 1)[1] for r in records]
    assert methods.count("ListAuditRecords") >= 7  # 6 lists, and the verify's pages
    assert methods.count("GetAuditCheckpoint") == 1


def test_a_retried_call_is_recorded_once(url: str) -> None:
    log = PostgresAuditLog(url)
    retried_call_cases(log)
    log.close()


def _retry_at_once(url: str, record: bytes, barrier: Any) -> str:
    log = PostgresAuditLog(url)
    barrier.wait(60)  # a replica that failed breaks it rather than hangs the rest
    stored = asyncio.run(log.append(AuditRecord.FromString(record)))
    log.close()
    return stored.name


def test_attempts_racing_on_several_replicas_leave_one_record(url: str) -> None:
    """A client that gave up on one replica while it was still answering: both
    replicas finish the call and write at the same moment; one record results."""
    PostgresAuditLog(url).close()
    record = attempt("6f1c2d3e-0000-4000-8000-000000000001").SerializeToString()
    context = multiprocessing.get_context("spawn")
    with context.Manager() as manager:
        barrier = manager.Barrier(4)
        with context.Pool(4) as pool:
            names = pool.starmap(_retry_at_once, [(url, record, barrier)] * 4)
    assert len(set(names)) == 1
    log = PostgresAuditLog(url)
    assert [r.name for r in _all(log)] == names[:1]
    log.close()


def test_a_table_from_before_request_ids_is_upgraded_by_its_owner(
    url: str, server: PostgresServer
) -> None:
    with psycopg.connect(url, autocommit=True) as owner:
        owner.execute(
            "CREATE TABLE audit_records (sequence_number BIGINT PRIMARY KEY, "
            "record_id TEXT NOT NULL UNIQUE, create_time_us BIGINT NOT NULL, "
            "principal TEXT NOT NULL, method TEXT NOT NULL, case_id TEXT NOT NULL, "
            "purpose INTEGER NOT NULL, collection TEXT NOT NULL, record BYTEA NOT NULL, "
            "record_hash BYTEA NOT NULL)"
        )
        first = next_record(draft(0), None)
        owner.execute(
            "INSERT INTO audit_records VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
            index_columns(first)[:10],
        )
        owner.execute("CREATE ROLE old_writer LOGIN")
        owner.execute("GRANT SELECT, INSERT ON audit_records TO old_writer")
    # A writer role may not add the column: it is told what to run.
    with pytest.raises(AuditSchemaError, match="facegrid audit setup-database"):
        PostgresAuditLog(url.replace("facegrid@", "old_writer@"))
    log = PostgresAuditLog(url)  # the owner upgrades it in place
    retried_call_cases(log)
    records = _all(log)
    assert records[0] == first
    assert verify_chain(records).intact
    log.close()


def test_one_replica_at_a_time_holds_a_task(url: str) -> None:
    """What retention sweeps use: a task held by one replica's log is refused to another
    until it is released, and released by a connection that went away."""
    first, second = PostgresAuditLog(url), PostgresAuditLog(url)

    async def body() -> None:
        async with first.exclusive("face-retention") as leading:
            assert leading
            async with second.exclusive("face-retention") as also:
                assert not also
            async with second.exclusive("event-retention") as other_task:
                assert other_task
        async with second.exclusive("face-retention") as now_free:
            assert now_free

    asyncio.run(body())
    first.close()
    second.close()
