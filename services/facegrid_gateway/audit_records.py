"""Audit records by name, for the calls that take one (GetAuditRecord, and the review
calls' reviewed record)."""

from __future__ import annotations

from facegrid.audit_log import NAME_PREFIX, AuditLog
from facegrid.errors import invalid_argument, not_found
from facegrid.v1 import face_service_pb2


async def record_named(log: AuditLog, name: str, field: str) -> face_service_pb2.AuditRecord:
    """The record ``name`` (``auditRecords/{audit_record}``, given in ``field``) names:
    INVALID_ARGUMENT for another form, NOT_FOUND if the log has none."""
    record_id = name.removeprefix(NAME_PREFIX)
    if not name.startswith(NAME_PREFIX) or not record_id or "/" in record_id:
        raise invalid_argument(field, "must be auditRecords/{audit_record}")
    record = await log.get(record_id)
    if record is None:
        raise not_found("facegrid.v1.AuditRecord", name)
    return record
