"""The gateway's policies, on a gateway built in this process with fake downstream services.

The gateway itself is real (its servicer, gatekeeper, audit log in SQLite, gRPC server on
127.0.0.1); detection, embedding and search are fakes that answer what each test sets
and record what they were asked, so that the thresholds, quality filter, face limits,
scopes and audit records can be checked without models. The end-to-end suites
(tests/e2e/test_gateway.py) run the same calls through the real services.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from facegrid import methods
from facegrid.accountability import Gatekeeper
from facegrid.auth import ALL_SCOPES, bearer_metadata, create_token
from facegrid.identification.faces import FacePipeline
from facegrid.identification.policy import QualityPolicy
from facegrid.internal.v1 import detection_pb2, embedding_pb2, search_pb2
from facegrid.v1 import common_pb2, face_service_pb2, face_service_pb2_grpc
from facegrid_gateway.app import FaceServicer, build_server
from fakes import (
    DEADLINE_S,
    FakeDownstream,
    Fakes,
    PublicSetup,
    ServerThread,
    assert_needs_its_scope,
    face,
    serving,
)
from grpc_helpers import error_info, error_reason

F = face_service_pb2
COLLECTION = "collections/gallery"
CONTEXT = common_pb2.IdentificationContext(
    purpose=common_pb2.IdentificationContext.PURPOSE_CRIMINAL_INVESTIGATION, case_id="CASE-1"
)


@dataclass
class Gateway:
    address: str
    fakes: Fakes
    setup: PublicSetup
    gatekeeper: Gatekeeper
    thread: ServerThread  # the server's event loop (what ingest would write, written there)

    @property
    def tokens(self) -> dict[str, str]:
        return self.setup.tokens


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    setup = PublicSetup.in_directory(tmp_path_factory.mktemp("gateway-unit"))
    fakes = Fakes()
    downstream = FakeDownstream(fakes)
    gatekeeper = setup.gatekeeper("facegrid.v1.FaceService")
    pipeline = FacePipeline(downstream, QualityPolicy(setup.settings.gateway))
    servicer = FaceServicer(setup.settings, gatekeeper, downstream, pipeline)
    thread = ServerThread()
    try:
        with serving(thread, lambda: build_server(setup.settings, servicer, port=0)) as address:
            yield Gateway(address, fakes, setup, gatekeeper, thread)
    finally:
        gatekeeper.audit_log.close()
        thread.close()


@pytest.fixture
def api(gateway: Gateway) -> Iterator[face_service_pb2_grpc.FaceServiceStub]:
    gateway.fakes.reset()
    with grpc.insecure_channel(gateway.address) as channel:
        yield face_service_pb2_grpc.FaceServiceStub(channel)


def call(gateway: Gateway, rpc: Any, request: Any, token: str = "all") -> Any:
    return rpc(request, timeout=DEADLINE_S, metadata=bearer_metadata(gateway.tokens[token]))


def refused(gateway: Gateway, rpc: Any, request: Any, token: str = "all") -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        call(gateway, rpc, request, token)
    return caught.value


def last_record(gateway: Gateway, api: Any, method: str) -> face_service_pb2.AuditRecord:
    page = call(gateway, api.ListAuditRecords, F.ListAuditRecordsRequest(page_size=1000))
    records = [r for r in page.audit_records if r.method.endswith(f"/{method}")]
    assert records, f"no audit record of {method}"
    return records[-1]


def search(**fields: Any) -> F.SearchFacesByImageRequest:
    return F.SearchFacesByImageRequest(parent=COLLECTION, image=b"image", context=CONTEXT, **fields)


# ---------------------------------------------------------------- thresholds


def test_a_caller_cannot_lower_the_threshold_below_the_administrators(
    gateway: Gateway, api: Any
) -> None:
    reply = call(gateway, api.SearchFacesByImage, search(face_match_threshold=1.0))
    threshold = reply.threshold
    assert threshold.requested == pytest.approx(1.0)
    assert threshold.applied == pytest.approx(threshold.minimum)
    assert threshold.minimum > 1.0
    (sent,) = gateway.fakes.sent(search_pb2.SearchFacesRequest)
    assert sent.min_similarity == pytest.approx(threshold.applied)
    assert threshold.expected_false_candidates >= 0
    assert reply.face_matches[0].false_match_rate > 0


def test_the_collection_minimum_raises_the_threshold(gateway: Gateway, api: Any) -> None:
    gateway.fakes.collection_minimum = 97.0
    reply = call(gateway, api.SearchFacesByImage, search(face_match_threshold=85.0))
    assert reply.threshold.collection_minimum == pytest.approx(97.0)
    assert reply.threshold.applied == pytest.approx(97.0)
    (sent,) = gateway.fakes.sent(search_pb2.SearchFacesRequest)
    assert sent.min_similarity == pytest.approx(97.0)


def test_a_threshold_out_of_range_is_refused_and_audited(gateway: Gateway, api: Any) -> None:
    error = refused(gateway, api.SearchFacesByImage, search(face_match_threshold=101.0))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert not gateway.fakes.sent(search_pb2.SearchFacesRequest)
    record = last_record(gateway, api, "SearchFacesByImage")
    assert record.status_code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert record.context.case_id == "CASE-1"


# ---------------------------------------------------------------- quality and faces


def test_a_blurred_probe_is_refused_naming_the_measure(gateway: Gateway, api: Any) -> None:
    gateway.fakes.faces = [face(sharpness=0.5)]
    error = refused(gateway, api.SearchFacesByImage, search())
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    info = error_info(error)
    code, metadata = info.reason, dict(info.metadata)
    assert code == "FACE_QUALITY"
    assert "sharpness" in metadata["measures"].split(",")
    assert not gateway.fakes.sent(embedding_pb2.EmbedChipsRequest)  # never embedded
    assert not gateway.fakes.sent(search_pb2.SearchFacesRequest)  # nor searched
    record = last_record(gateway, api, "SearchFacesByImage")
    assert record.status_code == grpc.StatusCode.INVALID_ARGUMENT.value[0]


def test_the_largest_face_is_the_probe_and_no_smaller_one_stands_in(
    gateway: Gateway, api: Any
) -> None:
    gateway.fakes.faces = [face(sharpness=0.5, size=300), face(size=100)]
    error = refused(gateway, api.SearchFacesByImage, search())
    assert error_reason(error) == "FACE_QUALITY"
    gateway.fakes.faces = [face(size=300), face(size=100)]
    reply = call(gateway, api.SearchFacesByImage, search())
    assert reply.detected_face_count == 2
    assert reply.searched_face.bounding_box.width == 300
    assert not reply.searched_face.HasField("chip")  # chips never leave the gateway


def test_an_image_without_a_face_is_refused(gateway: Gateway, api: Any) -> None:
    gateway.fakes.faces = []
    error = refused(gateway, api.SearchFacesByImage, search())
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_reason(error) == "NO_FACE"


@pytest.mark.parametrize("max_faces", [101, -1])
def test_detect_faces_takes_at_most_100_faces(gateway: Gateway, api: Any, max_faces: int) -> None:
    error = refused(gateway, api.DetectFaces, F.DetectFacesRequest(image=b"x", max_faces=max_faces))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert not gateway.fakes.sent(detection_pb2.DetectFacesRequest)


def test_detect_faces_asks_detection_for_what_the_caller_allows(gateway: Gateway, api: Any) -> None:
    gateway.fakes.faces = [face(size=s) for s in (300, 200, 100)]
    reply = call(gateway, api.DetectFaces, F.DetectFacesRequest(image=b"x", max_faces=2))
    assert len(reply.faces) == 2
    (sent,) = gateway.fakes.sent(detection_pb2.DetectFacesRequest)
    assert sent.max_faces == 2
    assert not sent.include_chips


# ---------------------------------------------------------------- failures downstream


def test_a_search_service_failure_is_unavailable_and_audited(gateway: Gateway, api: Any) -> None:
    gateway.fakes.search_error = grpc.StatusCode.UNAVAILABLE
    error = refused(gateway, api.SearchFacesByImage, search())
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    record = last_record(gateway, api, "SearchFacesByImage")
    assert record.status_code == grpc.StatusCode.UNAVAILABLE.value[0]
    assert record.collection == COLLECTION


# ---------------------------------------------------------------- scopes, every method


PUBLIC_METHODS = sorted(
    methods.of_service("facegrid.v1.FaceService").values(), key=lambda m: m.name
)


@pytest.mark.parametrize("facts", PUBLIC_METHODS, ids=lambda m: m.name)
def test_every_method_needs_its_scope_and_a_refusal_is_audited(
    gateway: Gateway, api: Any, facts: methods.MethodFacts
) -> None:
    assert_needs_its_scope(gateway.address, facts, gateway.setup)
    if facts.idempotency_level != methods.NO_SIDE_EFFECTS:
        record = last_record(gateway, api, facts.name)
        assert record.principal == f"without-{facts.required_scope}"
        assert record.status_code == grpc.StatusCode.PERMISSION_DENIED.value[0]


# ---------------------------------------------------------------- review decisions

Outcome = F.ReviewDecision.Outcome


def reviewed_search(gateway: Gateway, api: Any) -> tuple[str, str]:
    """A successful search: its audit record and its first candidate."""
    reply = call(gateway, api.SearchFacesByImage, search())
    assert reply.audit_record
    return reply.audit_record, reply.face_matches[0].face.name


def decide(record: str, candidate: str, outcome: Any, reason: str = "ears differ") -> Any:
    return F.CreateReviewDecisionRequest(
        review_decision=F.ReviewDecision(
            reviewed_record=record, candidate=candidate, outcome=outcome, reason=reason
        )
    )


def test_a_decision_is_an_audit_record_linked_to_the_search(gateway: Gateway, api: Any) -> None:
    record, candidate = reviewed_search(gateway, api)
    faces_before = len(gateway.fakes.requests)
    first = call(
        gateway, api.CreateReviewDecision, decide(record, candidate, Outcome.OUTCOME_NOT_A_MATCH)
    )
    later = call(
        gateway,
        api.CreateReviewDecision,
        decide(record, candidate, Outcome.OUTCOME_POSSIBLE_MATCH, "same scar, left brow"),
    )
    # Nothing reached the services behind the gateway: no stored face was touched.
    assert len(gateway.fakes.requests) == faces_before
    decision = call(gateway, api.GetAuditRecord, F.GetAuditRecordRequest(name=first.audit_record))
    stored = decision.audit_record
    assert stored.method == "/facegrid.v1.FaceService/CreateReviewDecision"
    assert stored.target == record
    assert stored.context.case_id == CONTEXT.case_id
    assert stored.principal == "examiner"
    assert stored.review_decision.outcome == Outcome.OUTCOME_NOT_A_MATCH
    assert stored.review_decision.reason == "ears differ"
    listed = call(
        gateway, api.ListReviewDecisions, F.ListReviewDecisionsRequest(reviewed_record=record)
    )
    assert [r.name for r in listed.audit_records] == [first.audit_record, later.audit_record]
    assert [r.review_decision.outcome for r in listed.audit_records] == [
        Outcome.OUTCOME_NOT_A_MATCH,
        Outcome.OUTCOME_POSSIBLE_MATCH,
    ]
    assert not listed.next_page_token


def test_decisions_are_listed_per_search_and_page_by_page(gateway: Gateway, api: Any) -> None:
    record, candidate = reviewed_search(gateway, api)
    other, other_candidate = reviewed_search(gateway, api)
    made = [
        call(
            gateway,
            api.CreateReviewDecision,
            decide(record, candidate, Outcome.OUTCOME_INCONCLUSIVE, f"r{i}"),
        ).audit_record
        for i in range(3)
    ]
    call(
        gateway,
        api.CreateReviewDecision,
        decide(other, other_candidate, Outcome.OUTCOME_NOT_A_MATCH),
    )
    seen, token = [], ""
    while True:
        page = call(
            gateway,
            api.ListReviewDecisions,
            F.ListReviewDecisionsRequest(reviewed_record=record, page_size=2, page_token=token),
        )
        seen += [r.name for r in page.audit_records]
        token = page.next_page_token
        if not token:
            break
    assert seen == made


def test_a_decision_must_name_a_candidate_an_outcome_and_a_reason(
    gateway: Gateway, api: Any
) -> None:
    record, _ = reviewed_search(gateway, api)
    error = refused(
        gateway,
        api.CreateReviewDecision,
        decide(record, "collections/gallery/faces/other", Outcome.OUTCOME_UNSPECIFIED, " "),
    )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_reason(error) == "REVIEW_DECISION_INVALID"
    refusal = last_record(gateway, api, "CreateReviewDecision")
    assert refusal.status_code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert refusal.target == record  # a refused decision is on record too
    assert not refusal.HasField("review_decision")
    listed = call(
        gateway, api.ListReviewDecisions, F.ListReviewDecisionsRequest(reviewed_record=record)
    )
    assert not listed.audit_records


def test_only_a_successful_identification_can_be_reviewed(gateway: Gateway, api: Any) -> None:
    missing = refused(
        gateway,
        api.CreateReviewDecision,
        decide("auditRecords/no-such-record", "x", Outcome.OUTCOME_NOT_A_MATCH),
    )
    assert missing.code() == grpc.StatusCode.NOT_FOUND
    record, _ = reviewed_search(gateway, api)
    call(gateway, api.GetAuditRecord, F.GetAuditRecordRequest(name=record))
    not_identification = last_record(gateway, api, "GetAuditRecord").name
    error = refused(
        gateway,
        api.CreateReviewDecision,
        decide(not_identification, "x", Outcome.OUTCOME_NOT_A_MATCH),
    )
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    failed_search = refused(gateway, api.SearchFacesByImage, search(face_match_threshold=101.0))
    assert failed_search.code() == grpc.StatusCode.INVALID_ARGUMENT
    failed = last_record(gateway, api, "SearchFacesByImage").name
    error = refused(
        gateway, api.ListReviewDecisions, F.ListReviewDecisionsRequest(reviewed_record=failed)
    )
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_a_match_event_is_reviewed_like_a_search(gateway: Gateway, api: Any) -> None:
    """Ingest writes each match event's audit record to the same log; its candidates are
    decided on as a search's are, and listing the decisions returns the event's record."""
    event = F.AuditRecord(
        principal="camera-operator",
        method="/facegrid.v1.IngestService/MatchEvent",
        context=common_pb2.IdentificationContext(
            purpose=common_pb2.IdentificationContext.PURPOSE_WATCHLIST_MONITORING,
            case_id="CASE-WATCH",
        ),
        collection=COLLECTION,
        target="streamProcessors/gate/matchEvents/e-1",
        result_resources=[f"{COLLECTION}/faces/f-1"],
        result_similarities=[93.0],
        result_false_match_rates=[1e-6],
    )
    event.create_time.GetCurrentTime()
    stored = gateway.thread.run(gateway.gatekeeper.audit_log.append(event))
    decided = call(
        gateway,
        api.CreateReviewDecision,
        decide(stored.name, f"{COLLECTION}/faces/f-1", Outcome.OUTCOME_INCONCLUSIVE, "blurred"),
    )
    listed = call(
        gateway, api.ListReviewDecisions, F.ListReviewDecisionsRequest(reviewed_record=stored.name)
    )
    assert [r.name for r in listed.audit_records] == [decided.audit_record]
    assert listed.reviewed_audit_record.name == stored.name
    assert list(listed.reviewed_audit_record.result_similarities) == [93.0]
    assert listed.audit_records[0].context.case_id == "CASE-WATCH"
    error = refused(
        gateway,
        api.CreateReviewDecision,
        decide(stored.name, f"{COLLECTION}/faces/other", Outcome.OUTCOME_NOT_A_MATCH),
    )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_a_caller_limited_to_other_purposes_cannot_review(gateway: Gateway, api: Any) -> None:
    record, candidate = reviewed_search(gateway, api)  # for a criminal investigation
    credentials = gateway.setup.settings.gateway.credentials_file
    token = create_token(credentials, "trainee", ALL_SCOPES, purposes=["PURPOSE_TESTING"])
    gateway.setup.tokens["trainee"] = token
    gateway.gatekeeper.authenticator.reload()
    error = refused(
        gateway,
        api.CreateReviewDecision,
        decide(record, candidate, Outcome.OUTCOME_NOT_A_MATCH),
        token="trainee",
    )
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    assert error_reason(error) == "PURPOSE_NOT_ALLOWED"
    error = refused(
        gateway,
        api.ListReviewDecisions,
        F.ListReviewDecisionsRequest(reviewed_record=record),
        token="trainee",
    )
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
