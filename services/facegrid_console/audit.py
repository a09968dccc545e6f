"""The audit log: search its records, open one, verify the chain.

Listing and verifying need the facegrid.audit scope (the gateway refuses others). The
chain is checked here as `facegrid audit verify` checks it (facegrid.audit_chain), page
by page from record 1, against the gateway's newest signed checkpoint and against a
``sequence:hash`` the person kept elsewhere, if given: a removal of the newest records
shows only against such a copy.
"""

from __future__ import annotations

from dataclasses import dataclass

from facegrid import audit_checkpoint
from facegrid.audit_chain import ChainBreak, verify_chain
from facegrid.v1 import face_service_pb2
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from facegrid_console import views
from facegrid_console.web import Console, Signed, checked_form, signed_in, text

F = face_service_pb2

PAGE_SIZE = 50
_VERIFY_PAGE = 1000
FILTERS = ("case_id", "principal", "collection", "method")


@dataclass
class Verification:
    records: int
    first: int | None
    last: int | None
    last_hash: str
    problem: str
    checkpoint: str
    key_id: str


def routes(console: Console) -> list[BaseRoute]:
    faces = console.backend.face

    async def audit_list(request: Request, signed: Signed) -> Response:
        query = request.query_params
        given = {name: query.get(name, "").strip() for name in FILTERS}
        audit_filter = F.AuditRecordFilter(
            case_id=given["case_id"],
            principal=given["principal"],
            collection=given["collection"],
            method=given["method"],
        )
        given["purpose"] = query.get("purpose", "")
        audit_filter.purpose = views.purpose_value(given["purpose"])  # type: ignore[assignment]
        reply = await faces(
            "ListAuditRecords",
            F.ListAuditRecordsRequest(
                page_size=PAGE_SIZE, page_token=query.get("page_token", ""), filter=audit_filter
            ),
            signed.token,
        )
        return console.render(
            request,
            "audit.html",
            {"reply": reply, "given": given, "purposes": views.PURPOSES, "filters": given},
            signed=signed,
        )

    async def audit_record(request: Request, signed: Signed) -> Response:
        record_id = str(request.path_params["record"])
        reply = await faces(
            "GetAuditRecord",
            F.GetAuditRecordRequest(name=f"auditRecords/{record_id}"),
            signed.token,
        )
        return console.render(
            request, "audit_record.html", {"record": reply.audit_record}, signed=signed
        )

    async def verify(request: Request, signed: Signed) -> Response:
        form = await checked_form(console, request, signed)
        anchors = _kept_hash(text(form, "expect"))
        checkpoint = await faces("GetAuditCheckpoint", F.GetAuditCheckpointRequest(), signed.token)
        checked = ""
        key = ""
        if checkpoint.signed_note:
            public_key = audit_checkpoint.load_public_key(checkpoint.public_key_pem.encode())
            key = audit_checkpoint.key_id(public_key).hex()
            try:
                signed_point = audit_checkpoint.verify(checkpoint.signed_note, public_key)
            except audit_checkpoint.CheckpointError as error:
                checked = f"the checkpoint does not verify: {error}"
            else:
                if signed_point.sequence_number:
                    anchors.setdefault(signed_point.sequence_number, signed_point.record_hash)
                checked = (
                    f"signed checkpoint at record {signed_point.sequence_number}, "
                    f"{signed_point.time:%Y-%m-%d %H:%M:%S} UTC"
                )
        result = await _verify_all(console, signed, anchors)
        result.checkpoint, result.key_id = checked, key
        return console.render(request, "verified.html", {"result": result}, signed=signed)

    async def verify_page(request: Request, signed: Signed) -> Response:
        return console.render(request, "verify.html", {}, signed=signed)

    return [
        Route("/audit", signed_in(console, audit_list), methods=["GET"]),
        Route("/audit/verify", signed_in(console, verify_page), methods=["GET"]),
        Route("/audit/verify", signed_in(console, verify), methods=["POST"]),
        Route("/audit/records/{record}", signed_in(console, audit_record), methods=["GET"]),
    ]


def _kept_hash(value: str) -> dict[int, bytes]:
    """``sequence:hexhash`` (what `facegrid audit verify` prints) as an anchor."""
    if not value:
        return {}
    sequence, _, digest = value.partition(":")
    try:
        return {int(sequence): bytes.fromhex(digest)}
    except ValueError as error:
        raise HTTPException(400, "A kept hash reads sequence:hex, e.g. 120:9f3a…") from error


async def _verify_all(console: Console, signed: Signed, anchors: dict[int, bytes]) -> Verification:
    """The whole chain, a page at a time (never the whole log in memory)."""
    token = ""
    previous: bytes | None = None
    records, first, last, last_hash = 0, None, None, b""
    problem: ChainBreak | None = None
    while True:
        reply = await console.backend.face(
            "ListAuditRecords",
            F.ListAuditRecordsRequest(page_size=_VERIFY_PAGE, page_token=token),
            signed.token,
        )
        page = list(reply.audit_records)
        if page:
            low, high = page[0].sequence_number, page[-1].sequence_number
            here = {s: h for s, h in anchors.items() if low <= s <= high}
            report = verify_chain(page, previous_hash=previous, anchors=here)
            records += report.records
            first = first if first is not None else report.first_sequence
            if report.first_break is not None:
                problem = report.first_break
                break
            last, last_hash = report.last_sequence, report.last_hash
            previous = report.last_hash
            for sequence in here:
                anchors.pop(sequence)
        token = reply.next_page_token
        if not token:
            break
    message = str(problem) if problem else ""
    if not problem and anchors:
        missing = min(anchors)
        message = (
            f"record {missing}: its hash was kept, but the log ends at record {last} "
            "(newest records removed?)"
        )
    return Verification(records, first, last, last_hash.hex(), message, "", "")
