"""Audit records for the audit-log tests, and what both databases must do with them."""

from __future__ import annotations

import asyncio
import os
from typing import Any

from facegrid.v1 import common_pb2, face_service_pb2

AuditRecord = face_service_pb2.AuditRecord


def draft(i: int, case_id: str = "C-1") -> AuditRecord:
    return AuditRecord(
        principal=f"user-{i}",
        method="/facegrid.v1.FaceService/SearchFacesByImage",
        context=common_pb2.IdentificationContext(
            purpose=common_pb2.IdentificationContext.PURPOSE_TESTING, case_id=case_id
        ),
        collection="collections/gallery",
        result_resources=[f"collections/gallery/faces/{i}"],
    )


def append(log: Any, count: int, case_id: str = "C-1") -> list[AuditRecord]:
    """Append ``count`` drafts to either log, in order; the records as stored."""

    async def run() -> list[AuditRecord]:
        return [await log.append(draft(i, case_id)) for i in range(count)]

    return asyncio.run(run())


def attempt(request_id: str, result: str = "faces/1", status: int = 0) -> AuditRecord:
    """One attempt of a search: its time and trace are its own."""
    record = AuditRecord(
        principal="investigator-1",
        method="/facegrid.v1.FaceService/SearchFacesByImage",
        context=common_pb2.IdentificationContext(
            purpose=common_pb2.IdentificationContext.PURPOSE_TESTING, case_id="C-9"
        ),
        collection="collections/gallery",
        image_digests=[b"\x01" * 32],
        result_resources=[f"collections/gallery/{result}"],
        request_id=request_id,
        status_code=status,
        trace_id=os.urandom(16).hex(),
    )
    record.create_time.GetCurrentTime()
    return record


def retried_call_cases(log: Any) -> None:
    """What both databases must do with a retried call (shared with the PostgreSQL test)."""

    async def run() -> None:
        first = await log.append(attempt("3b241101-e2bb-4255-8caf-4136c566a962"))
        # The same call again (its reply was lost): the first record, no second one.
        again = await log.append(attempt("3b241101-e2bb-4255-8caf-4136c566a962"))
        assert again == first
        # Answered differently (the gallery changed in between): a record of its own.
        changed = await log.append(attempt(first.request_id, result="faces/2"))
        assert changed.sequence_number == first.sequence_number + 1
        # Failures, and calls without a request_id, are each recorded.
        failed = [await log.append(attempt(first.request_id, status=14)) for _ in range(2)]
        assert failed[1].sequence_number == failed[0].sequence_number + 1
        plain = [await log.append(attempt("")) for _ in range(2)]
        assert plain[1].sequence_number == plain[0].sequence_number + 1
        page = await log.list(face_service_pb2.AuditRecordFilter(case_id="C-9"), 0, 100)
        assert [r.name for r in page.records] == [
            first.name,
            changed.name,
            *(r.name for r in failed),
            *(r.name for r in plain),
        ]

    asyncio.run(run())
