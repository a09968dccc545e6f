"""The audit log on a real SQLite file: append-only, hash-chained, tamper-evident."""

from __future__ import annotations

import asyncio
import itertools
import sqlite3
from pathlib import Path
from typing import Any

import grpc
import pytest
from facegrid.accountability import AuditDraft, Gatekeeper, _identification_context
from facegrid.audit_chain import record_digest, verify_chain
from facegrid.audit_log import AuditChainError, SqliteAuditLog, index_columns, next_record
from facegrid.auth import Credentials
from facegrid.errors import ServiceError
from facegrid.v1 import common_pb2, face_service_pb2, ingest_pb2

from tests.e2e.audit_helpers import append, attempt, retried_call_cases

AuditRecord = face_service_pb2.AuditRecord


def test_records_are_chained_and_verify(tmp_path: Path) -> None:
    log = SqliteAuditLog(tmp_path / "audit.db")
    records = append(log, 5)
    assert [r.sequence_number for r in records] == [1, 2, 3, 4, 5]
    assert records[0].previous_record_hash == b""
    for before, after in itertools.pairwise(records):
        assert after.previous_record_hash == before.record_hash
    assert all(record_digest(r) == r.record_hash for r in records)
    assert verify_chain(records).intact
    page = asyncio.run(log.list(face_service_pb2.AuditRecordFilter(case_id="C-1"), 2, 2))
    assert [r.sequence_number for r in page.records] == [3, 4]
    assert page.more
    assert asyncio.run(log.get(records[2].name.split("/")[1])) == records[2]
    log.close()
    # Reopened, the chain goes on where it stopped.
    reopened = SqliteAuditLog(tmp_path / "audit.db")
    more = append(reopened, 1)
    assert more[0].sequence_number == 6
    assert more[0].previous_record_hash == records[-1].record_hash
    reopened.close()


def test_records_cannot_be_updated_or_deleted_through_sqlite(tmp_path: Path) -> None:
    log = SqliteAuditLog(tmp_path / "audit.db")
    append(log, 2)
    log.close()
    db = sqlite3.connect(tmp_path / "audit.db")
    with pytest.raises(sqlite3.DatabaseError, match="append-only"):
        db.execute("UPDATE audit_records SET principal = 'someone-else'")
    with pytest.raises(sqlite3.DatabaseError, match="append-only"):
        db.execute("DELETE FROM audit_records WHERE sequence_number = 1")
    db.close()


def test_a_tampered_log_is_refused_at_start(tmp_path: Path) -> None:
    path = tmp_path / "audit.db"
    log = SqliteAuditLog(path)
    records = append(log, 3)
    log.close()
    # Someone with write access to the file drops the triggers and edits a record.
    edited = AuditRecord()
    edited.CopyFrom(records[1])
    edited.principal = "someone-else"
    db = sqlite3.connect(path)
    db.execute("DROP TRIGGER audit_records_no_update")
    db.execute(
        "UPDATE audit_records SET record = ? WHERE sequence_number = 2",
        (edited.SerializeToString(deterministic=True),),
    )
    db.commit()
    db.close()
    with pytest.raises(AuditChainError, match="record 2"):
        SqliteAuditLog(path)
    assert not verify_chain([records[0], edited, records[2]]).intact


def test_no_results_without_an_audit_record(tmp_path: Path) -> None:
    """If the record cannot be written, the call fails with UNAVAILABLE."""
    log = SqliteAuditLog(tmp_path / "audit.db")
    gatekeeper = Gatekeeper(Credentials([]), log, "facegrid.v1.FaceService")
    log.close()  # the log is gone: every write fails
    draft = AuditDraft(AuditRecord(principal="p", method="/m"))
    with pytest.raises(ServiceError) as raised:
        asyncio.run(gatekeeper._write(draft, grpc.StatusCode.OK))
    assert raised.value.code == grpc.StatusCode.UNAVAILABLE


def _write_from_another_process(path: str, count: int, case_id: str, go: Any) -> None:
    log = SqliteAuditLog(Path(path))
    go.wait(60)  # a Barrier: both begin together
    append(log, count, case_id)
    log.close()


def test_two_writing_processes_never_fork_the_chain(tmp_path: Path) -> None:
    """The gateway and the ingest service append to one log file: with two processes
    appending at once, every record is kept and the chain stays one line."""
    import multiprocessing

    path = tmp_path / "audit.db"
    SqliteAuditLog(path).close()
    spawn = multiprocessing.get_context("spawn")
    go = spawn.Barrier(2)
    writers = [
        spawn.Process(target=_write_from_another_process, args=(str(path), 150, f"C-{n}", go))
        for n in range(2)
    ]
    for writer in writers:
        writer.start()
    for writer in writers:
        writer.join(timeout=120)
        assert writer.exitcode == 0
    log = SqliteAuditLog(path)
    page = asyncio.run(log.list(face_service_pb2.AuditRecordFilter(), 0, 1000))
    log.close()
    assert len(page.records) == 300
    assert [r.sequence_number for r in page.records] == list(range(1, 301))
    assert verify_chain(page.records).intact
    cases = {r.context.case_id for r in page.records}
    assert cases == {"C-0", "C-1"}


def test_a_retried_call_is_recorded_once(tmp_path: Path) -> None:
    log = SqliteAuditLog(tmp_path / "audit.db")
    retried_call_cases(log)
    log.close()


def test_a_log_from_before_request_ids_is_upgraded_in_place(tmp_path: Path) -> None:
    path = tmp_path / "audit.db"
    old = sqlite3.connect(path)
    old.executescript(
        "CREATE TABLE audit_records (sequence_number INTEGER PRIMARY KEY, "
        "record_id TEXT NOT NULL UNIQUE, create_time_us INTEGER NOT NULL, "
        "principal TEXT NOT NULL, method TEXT NOT NULL, case_id TEXT NOT NULL, "
        "purpose INTEGER NOT NULL, collection TEXT NOT NULL, record BLOB NOT NULL, "
        "record_hash BLOB NOT NULL);"
    )
    draft = attempt("")
    draft.context.case_id = "C-old"
    record = next_record(draft, None)
    old.execute(
        "INSERT INTO audit_records VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        index_columns(record)[:10],
    )
    old.commit()
    old.close()
    log = SqliteAuditLog(path)
    retried_call_cases(log)
    records = asyncio.run(log.list(face_service_pb2.AuditRecordFilter(), 0, 100)).records
    assert records[0] == record
    assert verify_chain(list(records)).intact
    log.close()


def test_a_purpose_the_caller_may_not_use_is_refused_also_inside_a_stream_processor(
    tmp_path: Path,
) -> None:

    log = SqliteAuditLog(tmp_path / "audit.db")
    gatekeeper = Gatekeeper(Credentials([]), log, "facegrid.v1.IngestService")
    draft = AuditDraft(AuditRecord(principal="missing-persons"))
    draft.purposes = frozenset({"PURPOSE_MISSING_PERSON"})
    watch = ingest_pb2.CreateStreamProcessorRequest()
    watch.stream_processor.context.purpose = (
        common_pb2.IdentificationContext.PURPOSE_WATCHLIST_MONITORING
    )
    with pytest.raises(ServiceError) as refused:
        gatekeeper.check_purpose(draft, _identification_context(watch))
    assert refused.value.code == grpc.StatusCode.PERMISSION_DENIED
    watch.stream_processor.context.purpose = common_pb2.IdentificationContext.PURPOSE_MISSING_PERSON
    gatekeeper.check_purpose(draft, _identification_context(watch))  # allowed
    assert _identification_context(face_service_pb2.GetCollectionRequest()) is None
    log.close()
