"""Examiners' decisions on the candidates of identification calls (CreateReviewDecision,
ListReviewDecisions).

A decision is an audit record of its own, in the chain: its ``review_decision``, the
reviewed call's identification context (so that it is found by case like the call),
and the reviewed record as its ``target``. Nothing else is stored and no face, subject
or collection is touched: a candidate list stays a list of candidates, and what a
person decided about one of them is on record beside the search that produced it.
"""

from __future__ import annotations

import grpc
from facegrid import paging
from facegrid.audit_log import AuditLog
from facegrid.errors import failed_precondition, invalid_arguments
from facegrid.v1 import face_service_pb2

from facegrid_gateway import audit_records

F = face_service_pb2
Outcome = F.ReviewDecision.Outcome

SERVICE = "/facegrid.v1.FaceService/"
CREATE_REVIEW_DECISION = SERVICE + "CreateReviewDecision"
# The records whose candidates an examiner reviews: the calls that return candidates,
# and the match events of stream processors (written by ingest to the same log).
MATCH_EVENT = "/facegrid.v1.IngestService/MatchEvent"
IDENTIFICATIONS = frozenset(
    [
        *(
            SERVICE + name
            for name in (
                "CompareFaces",
                "SearchFaces",
                "SearchFacesByImage",
                "SearchSubjectsByImage",
            )
        ),
        MATCH_EVENT,
    ]
)
MAX_REASON = 2000
# Records of the case read at once while looking for one call's decisions.
_SCAN_PAGE = 200
_OK = grpc.StatusCode.OK.value[0]


async def reviewed_record(log: AuditLog, name: str, field: str) -> F.AuditRecord:
    """The identification call's audit record that ``name`` names."""
    record = await audit_records.record_named(log, name, field)
    if record.method not in IDENTIFICATIONS or record.status_code != _OK:
        raise failed_precondition(
            "NOT_AN_IDENTIFICATION",
            name,
            f"{name} is not the record of a successful identification call "
            "(CompareFaces, SearchFaces, SearchFacesByImage or SearchSubjectsByImage) "
            "or of a match event",
        )
    return record


def check_decision(decision: F.ReviewDecision, reviewed: F.AuditRecord) -> None:
    """The candidate is one of the reviewed call's results; outcome and reason are given."""
    violations = []
    if decision.candidate not in reviewed.result_resources:
        violations.append(
            (
                "review_decision.candidate",
                f"{decision.candidate or 'empty'} is not a candidate of {reviewed.name}",
            )
        )
    if decision.outcome == Outcome.OUTCOME_UNSPECIFIED or decision.outcome not in Outcome.values():
        violations.append(
            (
                "review_decision.outcome",
                "OUTCOME_POSSIBLE_MATCH, OUTCOME_NOT_A_MATCH or OUTCOME_INCONCLUSIVE",
            )
        )
    reason = decision.reason.strip()
    if not reason or len(decision.reason) > MAX_REASON:
        violations.append(("review_decision.reason", f"1 to {MAX_REASON} characters"))
    if violations:
        raise invalid_arguments(violations, reason="REVIEW_DECISION_INVALID")


async def decisions_of(
    log: AuditLog, reviewed: F.AuditRecord, page_size: int, page_token: str
) -> F.ListReviewDecisionsResponse:
    """One page of the decisions recorded on ``reviewed``'s candidates, oldest first.

    They are the successful CreateReviewDecision records of its case that name it as
    their target, all written after it: the case's records are read in log order from
    the reviewed one (or the page token's position) until a page is full."""
    fingerprint = paging.request_fingerprint("review-decisions", reviewed.name)
    after = int(paging.decode_page_token(page_token, fingerprint) or reviewed.sequence_number)
    where = F.AuditRecordFilter(case_id=reviewed.context.case_id, method=CREATE_REVIEW_DECISION)
    found: list[F.AuditRecord] = []
    while True:
        page = await log.list(where, after, _SCAN_PAGE)
        for index, record in enumerate(page.records):
            after = record.sequence_number
            if record.target != reviewed.name or record.status_code != _OK:
                continue
            found.append(record)
            if len(found) == page_size:
                more = page.more or index < len(page.records) - 1
                token = paging.encode_page_token(str(after), fingerprint) if more else ""
                return F.ListReviewDecisionsResponse(
                    audit_records=found, next_page_token=token, reviewed_audit_record=reviewed
                )
        if not page.more:
            return F.ListReviewDecisionsResponse(
                audit_records=found, reviewed_audit_record=reviewed
            )
