"""Every method's scope and idempotency, as the contract declares them (its method
options), against what its comment promises and what the code does with them."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from facegrid import methods
from facegrid.accountability import Gatekeeper
from facegrid.auth import ALL_SCOPES, Credentials
from facegrid.internal.v1 import detection_pb2, embedding_pb2, search_pb2
from facegrid.v1 import face_service_pb2, ingest_pb2

PROTOS = Path(__file__).resolve().parents[2] / "protos" / "facegrid"
PUBLIC = {
    "facegrid.v1.FaceService": "v1/face_service.proto",
    "facegrid.v1.IngestService": "v1/ingest.proto",
}
INTERNAL = {
    "facegrid.internal.v1.DetectionService": "internal/v1/detection.proto",
    "facegrid.internal.v1.EmbeddingService": "internal/v1/embedding.proto",
    "facegrid.internal.v1.SearchService": "internal/v1/search.proto",
}
MODULES = (detection_pb2, embedding_pb2, face_service_pb2, ingest_pb2, search_pb2)

# The scope of each public method: the table README and the operators' credential files
# rely on. A change here is a change of who may call what.
SCOPES = {
    "DetectFaces": "facegrid.detect",
    "CompareFaces": "facegrid.compare",
    "SearchFaces": "facegrid.search",
    "SearchFacesByImage": "facegrid.search",
    "SearchSubjectsByImage": "facegrid.search",
    "GetCollection": "facegrid.read",
    "ListCollections": "facegrid.read",
    "GetFace": "facegrid.read",
    "ListFaces": "facegrid.read",
    "GetSubject": "facegrid.read",
    "ListSubjects": "facegrid.read",
    "IndexFaces": "facegrid.enrol",
    "CreateSubject": "facegrid.enrol",
    "AssociateFaces": "facegrid.enrol",
    "DisassociateFaces": "facegrid.enrol",
    "BatchDeleteFaces": "facegrid.delete",
    "DeleteSubject": "facegrid.delete",
    "CreateCollection": "facegrid.admin",
    "UpdateCollection": "facegrid.admin",
    "DeleteCollection": "facegrid.admin",
    "GetAuditRecord": "facegrid.audit",
    "ListAuditRecords": "facegrid.audit",
    "GetAuditCheckpoint": "facegrid.audit",
    "CreateReviewDecision": "facegrid.review",
    "ListReviewDecisions": "facegrid.review",
    "CreateStreamProcessor": "facegrid.ingest.admin",
    "GetStreamProcessor": "facegrid.ingest.admin",
    "ListStreamProcessors": "facegrid.ingest.admin",
    "UpdateStreamProcessor": "facegrid.ingest.admin",
    "DeleteStreamProcessor": "facegrid.ingest.admin",
    "StartStreamProcessor": "facegrid.ingest.admin",
    "StopStreamProcessor": "facegrid.ingest.admin",
    "PushFrames": "facegrid.ingest.push",
    "StreamMatchEvents": "facegrid.ingest.watch",
    "GetMatchEvent": "facegrid.ingest.watch",
    "ListMatchEvents": "facegrid.ingest.watch",
}


def comments(proto: str) -> dict[str, str]:
    """Each rpc's leading comment in a .proto file, joined into one line."""
    text = (PROTOS / proto).read_text()
    found = {}
    for match in re.finditer(r"((?:^ *//.*\n)+) *rpc (\w+)\(", text, flags=re.M):
        lines = [line.strip().removeprefix("//").strip() for line in match.group(1).splitlines()]
        found[match.group(2)] = " ".join(lines)
    return found


def all_methods(services: dict[str, str]) -> list[Any]:
    return [
        pytest.param(service, name, comments(proto)[name], id=f"{service.rsplit('.', 1)[1]}.{name}")
        for service, proto in services.items()
        for name in methods.of_service(service)
    ]


@pytest.mark.parametrize(("service", "name", "comment"), all_methods({**PUBLIC, **INTERNAL}))
def test_idempotency_is_what_the_comment_says(service: str, name: str, comment: str) -> None:
    facts = methods.method(service, name)
    says_idempotent = bool(re.search(r"(?<!Not )\bIdempotent\b", comment))
    when = re.search(r"Idempotent (?:only )?(?:when|with) `(\w+)`", comment)
    if when:
        assert facts.idempotent_when == when.group(1), comment
        assert not facts.always_idempotent
    else:
        assert facts.always_idempotent == says_idempotent, comment
        assert facts.idempotent_when == ""


@pytest.mark.parametrize(("service", "name", "comment"), all_methods(PUBLIC))
def test_every_public_method_has_its_scope(service: str, name: str, comment: str) -> None:
    facts = methods.method(service, name)
    assert facts.required_scope == SCOPES[name]
    assert facts.required_scope in ALL_SCOPES


@pytest.mark.parametrize(("service", "name", "comment"), all_methods(PUBLIC))
def test_a_public_call_is_audited_unless_it_has_no_side_effects(
    service: str, name: str, comment: str
) -> None:
    """The gatekeeper audits what the contract says it does: an identification call
    (one with an IdentificationContext), and any change, always."""
    gatekeeper = Gatekeeper(Credentials([]), None, service)  # type: ignore[arg-type]
    method = methods.service_descriptor(service).methods_by_name[name]
    identifies = "context" in method.input_type.fields_by_name or "IdentificationContext" in (
        " ".join(f.message_type.name for f in method.input_type.fields if f.message_type)
    )
    if identifies or "Audited" in comment or "audited" in comment:
        assert gatekeeper.audited(name), comment
    if not gatekeeper.audited(name):
        assert methods.method(service, name).idempotency_level == methods.NO_SIDE_EFFECTS


def test_internal_methods_have_no_scope() -> None:
    """Scopes are the public services' (callers); internal services trust mutual TLS."""
    for service in INTERNAL:
        assert all(not f.required_scope for f in methods.of_service(service).values())


def test_the_gateway_retries_exactly_the_idempotent_internal_methods() -> None:
    names = {
        (entry["service"], entry["method"])
        for service in INTERNAL
        for entry in methods.retry_policy_names(service)
    }
    assert ("facegrid.internal.v1.SearchService", "SearchFaces") in names
    assert ("facegrid.internal.v1.SearchService", "BatchUpsertFaces") in names
    for never in ("CreateCollection", "DeleteCollection", "BatchDeleteFaces", "CreateSubject"):
        assert ("facegrid.internal.v1.SearchService", never) not in names


def test_a_conditional_method_is_retried_only_when_always_sent_with_its_field() -> None:
    def retried(service: str, sent_with: list[str]) -> set[str]:
        return {entry["method"] for entry in methods.retry_policy_names(service, sent_with)}

    face = "facegrid.v1.FaceService"
    assert methods.method(face, "IndexFaces").idempotent_when == "request_id"
    assert methods.method(face, "BatchDeleteFaces").idempotent_when == "allow_missing"
    assert "IndexFaces" not in retried(face, [])
    assert "IndexFaces" in retried(face, ["request_id"])  # the client always sets one
    assert "BatchDeleteFaces" not in retried(face, ["request_id"])
    assert "BatchDeleteFaces" in retried(face, ["allow_missing"])
    assert "CreateStreamProcessor" not in retried("facegrid.v1.IngestService", ["request_id"])


def test_a_service_without_scopes_cannot_be_guarded() -> None:
    with pytest.raises(ValueError, match="no required_scope"):
        Gatekeeper(Credentials([]), None, "facegrid.internal.v1.SearchService")  # type: ignore[arg-type]
