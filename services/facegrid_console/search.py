"""Search a collection with a probe photo, and review the candidates.

A search is SearchFacesByImage with the purpose, case and justification the person
gives (the gateway requires them, refuses purposes the person may not use, and applies
the administrator's threshold). Its result page shows the face searched with beside
each ranked candidate, with its similarity and false match rate, what the threshold
means for this gallery (the false candidates to expect), and a decision form per
candidate. Decisions are CreateReviewDecision calls, so each is an audit record linked
to the search's; the review page (``/reviews/{record}``) shows a search's or a match
event's candidates and every decision on them whenever it is opened again.
"""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass, field
from typing import Any

from facegrid.v1 import common_pb2, face_service_pb2
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import BaseRoute, Route

from facegrid_console import alerts, views
from facegrid_console.backend import CallError
from facegrid_console.web import Console, Signed, checked_form, signed_in, text, upload

F = face_service_pb2

Outcome = F.ReviewDecision.Outcome
OUTCOMES = [
    ("OUTCOME_POSSIBLE_MATCH", "Possible match (a lead, not an identification)"),
    ("OUTCOME_NOT_A_MATCH", "Not a match"),
    ("OUTCOME_INCONCLUSIVE", "Inconclusive"),
]
MAX_CANDIDATES = 50
_DECISION_PAGES = 20
MATCH_EVENT_METHOD = "/facegrid.v1.IngestService/MatchEvent"


@dataclass
class Candidate:
    rank: int
    name: str
    similarity: float
    false_match_rate: float
    subject_id: str = ""
    external_image_id: str = ""
    decisions: list[dict[str, Any]] = field(default_factory=list)

    @property
    def anchor(self) -> str:
        return f"candidate-{self.rank}"


def decision_view(record: F.AuditRecord) -> dict[str, Any]:
    decision = record.review_decision
    return {
        "outcome": views.outcome_label(decision.outcome),
        "outcome_name": Outcome.Name(decision.outcome),
        "reason": decision.reason,
        "principal": record.principal,
        "time": views.when(record.create_time),
        "record": record.name,
    }


def candidates_of_record(record: F.AuditRecord) -> list[Candidate]:
    return [
        Candidate(
            rank=index + 1,
            name=name,
            similarity=record.result_similarities[index]
            if index < len(record.result_similarities)
            else 0.0,
            false_match_rate=record.result_false_match_rates[index]
            if index < len(record.result_false_match_rates)
            else 0.0,
        )
        for index, name in enumerate(record.result_resources)
    ]


def routes(console: Console) -> list[BaseRoute]:
    async def search_form(request: Request, signed: Signed) -> Response:
        return console.render(
            request, "search.html", await _form_context(console, signed), signed=signed
        )

    async def run_search(request: Request, signed: Signed) -> Response:
        form = await checked_form(console, request, signed)
        photo = await upload(form, "photo")
        collection = text(form, "collection")
        context = common_pb2.IdentificationContext(
            purpose=views.purpose_value(text(form, "purpose")),  # type: ignore[arg-type]
            case_id=text(form, "case_id"),
            justification=text(form, "justification"),
        )
        request_message = F.SearchFacesByImageRequest(
            parent=f"collections/{collection}",
            image=photo,
            max_faces=_bounded_int(text(form, "max_candidates"), 10, 1, MAX_CANDIDATES),
            context=context,
            request_id=text(form, "request_id") or str(uuid.uuid4()),
        )
        threshold = text(form, "threshold")
        if threshold:
            try:
                request_message.face_match_threshold = float(threshold)
            except ValueError as error:
                raise HTTPException(400, "The threshold must be a number from 0 to 100.") from error
        try:
            reply = await console.backend.face("SearchFacesByImage", request_message, signed.token)
        except CallError as failure:
            page = await _form_context(console, signed)
            page.update(failure=failure, given=dict(form.items()))
            return console.render(
                request, "search.html", page, status_code=failure.http_status, signed=signed
            )
        candidates = [
            Candidate(
                rank=index + 1,
                name=match.face.name,
                similarity=match.similarity,
                false_match_rate=match.false_match_rate,
                subject_id=match.face.subject_id,
                external_image_id=match.face.external_image_id,
            )
            for index, match in enumerate(reply.face_matches)
        ]
        return console.render(
            request,
            "results.html",
            {
                "reply": reply,
                "collection": collection,
                "context": context,
                # Decoding a large photo takes a while: not on the event loop.
                "probe": await asyncio.to_thread(
                    views.probe_data_url,
                    photo,
                    reply.searched_face.bounding_box,
                    console.settings.images,
                ),
                "candidates": candidates,
                "record": reply.audit_record,
                "outcomes": OUTCOMES,
                "new_request_id": uuid.uuid4,
            },
            signed=signed,
        )

    async def review_page(request: Request, signed: Signed) -> Response:
        name = "auditRecords/" + request.path_params["record"]
        reviewed, decisions = await _decisions(console, signed, name)
        candidates = candidates_of_record(reviewed)
        by_name = {candidate.name: candidate for candidate in candidates}
        for record in decisions:
            candidate = by_name.get(record.review_decision.candidate)
            if candidate is not None:
                candidate.decisions.append(decision_view(record))
        event = reviewed.target if reviewed.method == MATCH_EVENT_METHOD else ""
        chip = await _event_chip(console, signed, event) if event else ""
        return console.render(
            request,
            "review.html",
            {
                "reviewed": reviewed,
                "candidates": candidates,
                "decision_count": len(decisions),
                "outcomes": OUTCOMES,
                "new_request_id": uuid.uuid4,
                "event": event,
                "chip": chip,
                "method": reviewed.method.rsplit("/", 1)[-1],
            },
            signed=signed,
        )

    async def record_decision(request: Request, signed: Signed) -> Response:
        form = await checked_form(console, request, signed)
        record_name = "auditRecords/" + request.path_params["record"]
        outcome = text(form, "outcome")
        decision = F.ReviewDecision(
            reviewed_record=record_name,
            candidate=text(form, "candidate"),
            outcome=Outcome.Value(outcome) if outcome in Outcome.keys() else None,  # type: ignore[arg-type]  # noqa: SIM118
            reason=text(form, "reason"),
        )
        await console.backend.face(
            "CreateReviewDecision",
            F.CreateReviewDecisionRequest(
                review_decision=decision, request_id=text(form, "request_id") or str(uuid.uuid4())
            ),
            signed.token,
        )
        anchor = text(form, "anchor")
        target = f"/reviews/{request.path_params['record']}?recorded=1"
        return RedirectResponse(target + (f"#{anchor}" if anchor else ""), status_code=303)

    async def open_review(request: Request, signed: Signed) -> Response:
        record = request.query_params.get("record", "").strip().removeprefix("auditRecords/")
        if not record or "/" in record:
            raise HTTPException(400, "Give an audit record, auditRecords/{id}.")
        return RedirectResponse(f"/reviews/{record}", status_code=303)

    return [
        Route("/search", signed_in(console, search_form), methods=["GET"]),
        Route("/search", signed_in(console, run_search), methods=["POST"]),
        Route("/reviews", signed_in(console, open_review), methods=["GET"]),
        Route("/reviews/{record}", signed_in(console, review_page), methods=["GET"]),
        Route("/reviews/{record}/decisions", signed_in(console, record_decision), methods=["POST"]),
    ]


async def _form_context(console: Console, signed: Signed) -> dict[str, Any]:
    """What the search form offers: the collections the person may read (a text field
    when they may not list them), the purposes, a request id for this submission."""
    collections: list[str] = []
    try:
        reply = await console.backend.face(
            "ListCollections", F.ListCollectionsRequest(page_size=100), signed.token
        )
        collections = [c.name.removeprefix("collections/") for c in reply.collections]
    except CallError:
        pass
    return {
        "collections": collections,
        "purposes": views.PURPOSES,
        "request_id": str(uuid.uuid4()),
        "given": {},
        "max_candidates": MAX_CANDIDATES,
    }


async def _decisions(
    console: Console, signed: Signed, name: str
) -> tuple[F.AuditRecord, list[F.AuditRecord]]:
    """The reviewed record and every decision on it, oldest first."""
    decisions: list[F.AuditRecord] = []
    token = ""
    reviewed = F.AuditRecord()
    for _ in range(_DECISION_PAGES):
        reply = await console.backend.face(
            "ListReviewDecisions",
            F.ListReviewDecisionsRequest(reviewed_record=name, page_size=1000, page_token=token),
            signed.token,
        )
        reviewed = reply.reviewed_audit_record
        decisions.extend(reply.audit_records)
        token = reply.next_page_token
        if not token:
            break
    return reviewed, decisions


async def _event_chip(console: Console, signed: Signed, event: str) -> str:
    """The match event's best shot, while ingest still keeps it ("" once erased, or for
    a person without the ingest.watch scope)."""
    try:
        return views.png_data_url(await alerts.match_event_chip(console, signed, event))
    except CallError:
        return ""


def _bounded_int(value: str, default: int, low: int, high: int) -> int:
    try:
        number = int(value)
    except ValueError:
        return default
    return max(low, min(high, number))
