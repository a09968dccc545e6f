"""Erasure of the match events that name deleted faces, subjects or collections.

A match event keeps the chip of a passer-by who looked like someone on a watch-list.
When that someone's face, subject or collection is deleted, the events that named it go
too. The gateway's deletions are in the audit log (the one chain the gateway and ingest
share), so ingest follows the log: every ``ingest.erasure_interval_s`` one replica (see
facegrid.retention) reads the records after the last it handled, and if any deletion
succeeded, erases every stored event whose matches name a deleted face, a face of a
deleted subject or a face of a deleted collection, payload and chip overwritten on
nats-server's disk. Each deletion that erased events gets an audit record of its own
(method EraseMatchEvents, target the deletion's record: the receipt names what was
erased and why). A replica starts from the beginning of the log; erasing twice finds
nothing the second time, so that costs reads, not correctness.
"""

from __future__ import annotations

from facegrid.audit_log import AuditLog
from facegrid.retention import Removal
from facegrid.v1 import face_service_pb2, ingest_pb2

from facegrid_ingest.event_log import EventLog, StoredEvent

ERASE_MATCH_EVENTS = "/facegrid.erasure/EraseMatchEvents"
PRINCIPAL = "facegrid:erasure"
TASK = "event-erasure"
_FACE_SERVICE = "/facegrid.v1.FaceService/"
DELETIONS = (
    _FACE_SERVICE + "BatchDeleteFaces",
    _FACE_SERVICE + "DeleteSubject",
    _FACE_SERVICE + "DeleteCollection",
)
_PAGE = 500
_MAX_LISTED = 1000  # event names listed in one receipt; the count is always exact


class EventErasure:
    """``sweep(now)``: erase the events named by deletions since the last sweep."""

    def __init__(self, events: EventLog, audit_log: AuditLog) -> None:
        self._events = events
        self._audit_log = audit_log
        self._after = 0  # the last audit sequence number handled

    async def sweep(self, now: float) -> list[Removal]:
        deletions, last = await self._deletions_since(self._after)
        if not deletions:
            self._after = last
            return []
        by_face: dict[str, face_service_pb2.AuditRecord] = {}
        by_subject: dict[str, face_service_pb2.AuditRecord] = {}
        by_collection: dict[str, face_service_pb2.AuditRecord] = {}
        for record in deletions:
            method = record.method.removeprefix(_FACE_SERVICE)
            if method == "BatchDeleteFaces":
                by_face.update(dict.fromkeys(record.result_resources, record))
            elif method == "DeleteSubject":
                by_subject[record.target] = record
            else:
                by_collection[record.collection] = record

        def cause(event: StoredEvent) -> face_service_pb2.AuditRecord | None:
            for match in ingest_pb2.MatchEvent.FromString(event.payload).matches:
                face = match.face.name
                collection = face.split("/faces/", 1)[0]
                subject_id = match.face.subject_id
                subject = f"{collection}/subjects/{subject_id}" if subject_id else ""
                found = (
                    by_face.get(face) or by_subject.get(subject) or by_collection.get(collection)
                )
                if found is not None:
                    return found
            return None

        erased = await self._events.erase_where(lambda event: cause(event) is not None)
        per_deletion: dict[str, list[str]] = {}
        for event in erased:
            responsible = cause(event)
            if responsible is not None:
                per_deletion.setdefault(responsible.name, []).append(
                    f"streamProcessors/{event.processor_id}/matchEvents/{event.event_id}"
                )
        self._after = last
        collections = {r.name: r.collection for r in deletions}
        return [
            Removal(
                ERASE_MATCH_EVENTS,
                collections[name],
                name,
                len(events),
                now,
                tuple(events[:_MAX_LISTED]),
            )
            for name, events in per_deletion.items()
        ]

    async def _deletions_since(self, after: int) -> tuple[list[face_service_pb2.AuditRecord], int]:
        """The successful deletions after sequence ``after``, and the last sequence read."""
        deletions = []
        while True:
            page = await self._audit_log.list(face_service_pb2.AuditRecordFilter(), after, _PAGE)
            deletions += [r for r in page.records if r.method in DELETIONS and r.status_code == 0]
            if page.last_sequence:
                after = page.last_sequence
            if not page.more:
                return deletions, after
