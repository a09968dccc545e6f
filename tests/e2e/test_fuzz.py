"""Fuzzing the public API through the real servers (hypothesis, tests/e2e/fuzz_messages.py).

Every method of FaceService and IngestService gets generated requests (any subset of
fields, any values, names of things that exist, real and broken images): each call must
end OK or with a status the contract documents, carrying a message; afterwards every
service is still up, a sentinel collection and stream processor are exactly as before,
and the audit chain verifies. The suite sends a few requests per method; by hand:

    FACEGRID_FUZZ_EXAMPLES=10000 .venv/bin/python -m pytest tests/e2e/test_fuzz.py -s

sends at least that many per service, drawn at random (the suite's are derandomized).
"""

from __future__ import annotations

import collections
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from facegrid.audit_chain import verify_chain
from facegrid.v1 import common_pb2, face_service_pb2, ingest_pb2, resources_pb2
from google.protobuf import descriptor, message, message_factory, struct_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from skimage import data

from tests.e2e.cluster import all_audit_records
from tests.e2e.fuzz_messages import Vocabulary, message_strategy
from tests.e2e.ingest_helpers import IngestStack, ingest_stack
from tests.grpc_helpers import field_violations, png_bytes

F = face_service_pb2
I = ingest_pb2  # noqa: E741
TARGET = int(os.environ.get("FACEGRID_FUZZ_EXAMPLES", "0"))  # per service, by hand
SUITE_EXAMPLES_PER_METHOD = 10
CALL_TIMEOUT_S = 30.0
STREAM_TIMEOUT_S = 2.0
C = grpc.StatusCode
# What the contract documents for bad or unlucky input; anything else is a failure
# (UNKNOWN and INTERNAL above all: an unhandled exception in a servicer).
DOCUMENTED = {
    C.OK,
    C.INVALID_ARGUMENT,
    C.NOT_FOUND,
    C.ALREADY_EXISTS,
    C.FAILED_PRECONDITION,
    C.PERMISSION_DENIED,
    C.OUT_OF_RANGE,
    C.RESOURCE_EXHAUSTED,
    C.ABORTED,
}
# A stream reads until its deadline, which the fuzzer sets short.
STREAM_ENDINGS = {C.DEADLINE_EXCEEDED, C.CANCELLED}
SENTINEL = "sentinel"
ASTRONAUT = png_bytes(data.astronaut())


@dataclass
class Target:
    stack: IngestStack
    channels: dict[str, grpc.Channel]
    words: Vocabulary


@pytest.fixture(scope="module")
def target(model_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    work = tmp_path_factory.mktemp("fuzz")
    media = work / "media"
    media.mkdir()
    with ingest_stack(model_repo, work, [media]) as stack:
        _enrol(stack, SENTINEL)
        fuzz_face = _replenish(stack)
        words = Vocabulary(
            names=[
                "collections/fuzz",
                fuzz_face,
                "collections/fuzz/subjects/s1",
                "streamProcessors/fuzz",
                "streamProcessors/-",
                "streamProcessors/fuzz/matchEvents/-",
            ],
            ids=["fuzz", "s1", "cam-1", "CASE-FUZZ"],
            images=[ASTRONAUT],
        )
        channels = {
            "FaceService": grpc.insecure_channel(
                stack.stack.address, options=[("grpc.max_send_message_length", 64 << 20)]
            ),
            "IngestService": grpc.insecure_channel(
                stack.ingest_address, options=[("grpc.max_send_message_length", 64 << 20)]
            ),
        }
        yield Target(stack, channels, words)
        for channel in channels.values():
            channel.close()


# The fuzz collection's face gets the same name whenever it is enrolled again (face ids
# derive from the request_id, the collection and the image).
_FUZZ_REQUEST = "00000000-0000-4000-8000-00000000f022"


def _enrol(stack: IngestStack, collection_id: str) -> str:
    """A collection with one subject "s1" and the astronaut's face, and a stream
    processor of the same id watching it."""
    md = stack.metadata()
    parent = f"collections/{collection_id}"
    stack.faces.CreateCollection(
        F.CreateCollectionRequest(collection_id=collection_id), metadata=md, timeout=CALL_TIMEOUT_S
    )
    stack.faces.CreateSubject(
        F.CreateSubjectRequest(parent=parent, subject_id="s1"), metadata=md, timeout=CALL_TIMEOUT_S
    )
    indexed = stack.faces.IndexFaces(
        F.IndexFacesRequest(
            parent=parent,
            image=ASTRONAUT,
            subject_id="s1",
            max_faces=1,
            request_id=_FUZZ_REQUEST if collection_id == "fuzz" else "",
        ),
        metadata=md,
        timeout=CALL_TIMEOUT_S,
    )
    stack.ingest.CreateStreamProcessor(
        I.CreateStreamProcessorRequest(
            stream_processor_id=collection_id, stream_processor=_processor(parent)
        ),
        metadata=md,
        timeout=CALL_TIMEOUT_S,
    )
    return str(indexed.face_records[0].face.name)


def _replenish(stack: IngestStack) -> str:
    """Put the fuzz collection and processor back if a generated request removed them,
    so that the next method's requests find something."""
    md = stack.metadata()
    try:
        stack.faces.GetCollection(
            F.GetCollectionRequest(name="collections/fuzz"), metadata=md, timeout=CALL_TIMEOUT_S
        )
        stack.ingest.GetStreamProcessor(
            I.GetStreamProcessorRequest(name="streamProcessors/fuzz"),
            metadata=md,
            timeout=CALL_TIMEOUT_S,
        )
        return _face_of(stack, "collections/fuzz")
    except grpc.RpcError as error:
        if error.code() != C.NOT_FOUND:
            raise
    for call in (
        lambda: stack.ingest.DeleteStreamProcessor(
            I.DeleteStreamProcessorRequest(name="streamProcessors/fuzz"),
            metadata=md,
            timeout=CALL_TIMEOUT_S,
        ),
        lambda: stack.faces.DeleteCollection(
            F.DeleteCollectionRequest(name="collections/fuzz", force=True),
            metadata=md,
            timeout=CALL_TIMEOUT_S,
        ),
    ):
        try:
            call()
        except grpc.RpcError as error:
            if error.code() != C.NOT_FOUND:
                raise
    return _enrol(stack, "fuzz")


def _face_of(stack: IngestStack, parent: str) -> str:
    listed = stack.faces.ListFaces(
        F.ListFacesRequest(parent=parent), metadata=stack.metadata(), timeout=CALL_TIMEOUT_S
    )
    return listed.faces[0].name if listed.faces else ""


def _processor(collection: str) -> I.StreamProcessor:
    return I.StreamProcessor(
        collection=collection,
        context=common_pb2.IdentificationContext(
            purpose=common_pb2.IdentificationContext.PURPOSE_WATCHLIST_MONITORING,
            case_id="CASE-FUZZ",
        ),
        sources=[I.VideoSource(source_id="cam-1", push=I.PushSource())],
    )


def _state(target: Target) -> dict[str, Any]:
    """What must not change: the sentinel collection, its faces, subjects, a search
    result, and the sentinel stream processor's definition."""
    md = target.stack.metadata()
    faces = target.stack.faces
    parent = f"collections/{SENTINEL}"
    collection = faces.GetCollection(
        F.GetCollectionRequest(name=parent), metadata=md, timeout=CALL_TIMEOUT_S
    ).collection
    listed = faces.ListFaces(F.ListFacesRequest(parent=parent), metadata=md, timeout=CALL_TIMEOUT_S)
    subjects = faces.ListSubjects(
        F.ListSubjectsRequest(parent=parent), metadata=md, timeout=CALL_TIMEOUT_S
    )
    found = faces.SearchFacesByImage(
        F.SearchFacesByImageRequest(
            parent=parent,
            image=ASTRONAUT,
            context=common_pb2.IdentificationContext(
                purpose=common_pb2.IdentificationContext.PURPOSE_TESTING, case_id="CASE-FUZZ"
            ),
        ),
        metadata=md,
        timeout=CALL_TIMEOUT_S,
    )
    processor = target.stack.ingest.GetStreamProcessor(
        I.GetStreamProcessorRequest(name=f"streamProcessors/{SENTINEL}"),
        metadata=md,
        timeout=CALL_TIMEOUT_S,
    ).stream_processor
    return {
        "collection": (collection.face_count, collection.subject_count, collection.model_version),
        "faces": [f.SerializeToString(deterministic=True) for f in listed.faces],
        "subjects": [s.SerializeToString(deterministic=True) for s in subjects.subjects],
        "matches": [(m.face.name, round(m.similarity, 4)) for m in found.face_matches],
        "processor": (processor.collection, list(processor.sources), processor.context),
    }


def _serialize(request: message.Message) -> bytes:
    return request.SerializeToString()


def _call(
    channel: grpc.Channel,
    service: str,
    method: descriptor.MethodDescriptor,
    request: Any,
    metadata: tuple[tuple[str, str]],
) -> tuple[grpc.StatusCode, str]:
    path = f"/facegrid.v1.{service}/{method.name}"
    response_type = message_factory.GetMessageClass(method.output_type)
    serialize = _serialize
    deserialize = response_type.FromString
    try:
        if method.client_streaming:
            call = channel.stream_unary(path, serialize, deserialize)
            call(iter(request), timeout=CALL_TIMEOUT_S, metadata=metadata)
        elif method.server_streaming:
            stream = channel.unary_stream(path, serialize, deserialize)
            responses = stream(request, timeout=STREAM_TIMEOUT_S, metadata=metadata)
            for count, _ in enumerate(responses):
                if count >= 2:
                    responses.cancel()
                    return C.OK, ""
        else:
            channel.unary_unary(path, serialize, deserialize)(
                request, timeout=CALL_TIMEOUT_S, metadata=metadata
            )
    except grpc.RpcError as error:
        return error.code(), error.details() or ""
    return C.OK, ""


def _fuzzer(
    method: descriptor.MethodDescriptor,
    examples: int,
    check: Callable[[descriptor.MethodDescriptor, Any], None],
    words: Vocabulary,
) -> Callable[[], None]:
    """A hypothesis test that sends ``examples`` generated requests to ``method``."""
    single = message_strategy(method.input_type, words)
    strategy = st.lists(single, min_size=1, max_size=3) if method.client_streaming else single

    @settings(
        max_examples=examples,
        deadline=None,
        database=None,  # nothing written into the checkout
        derandomize=not TARGET,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(strategy)
    def fuzz(request: Any) -> None:
        check(method, request)

    return fuzz  # type: ignore[no-any-return]


def _methods(service: str) -> list[descriptor.MethodDescriptor]:
    module = face_service_pb2 if service == "FaceService" else ingest_pb2
    return list(module.DESCRIPTOR.services_by_name[service].methods)


@pytest.mark.parametrize("service", ["FaceService", "IngestService"])
def test_generated_requests_end_ok_or_with_a_documented_status(
    service: str, target: Target
) -> None:
    before = _state(target)
    metadata = target.stack.metadata()
    channel = target.channels[service]
    methods = _methods(service)
    outcomes: collections.Counter[tuple[str, str]] = collections.Counter()
    undocumented: list[str] = []
    examples: dict[tuple[str, str], str] = {}
    started = time.monotonic()
    per_method = -(-TARGET // len(methods)) if TARGET else SUITE_EXAMPLES_PER_METHOD
    rounds = 0

    def check(method: descriptor.MethodDescriptor, request: Any) -> None:
        code, details = _call(channel, service, method, request, metadata)
        outcomes[(method.name, code.name)] += 1
        examples.setdefault((method.name, code.name), details[:100])
        allowed = DOCUMENTED | (STREAM_ENDINGS if method.server_streaming else set())
        if code not in allowed or (code != C.OK and not details):
            undocumented.append(f"{method.name}: {code.name} {details!r} for {request!r}"[:2000])

    while True:
        rounds += 1
        for method in methods:
            _replenish(target.stack)
            _fuzzer(method, per_method, check, target.words)()
        sent = sum(outcomes.values())
        if not TARGET or sent >= TARGET:
            break
    elapsed = time.monotonic() - started
    print(f"\n{service}: {sent} requests in {elapsed:.0f} s ({rounds} rounds)")
    for (name, code), count in sorted(outcomes.items()):
        print(f"  {name:24s} {code:19s} {count:6d}  {examples[(name, code)]}")
    assert not undocumented, "\n".join(undocumented[:10])
    assert sent >= (TARGET or len(methods))
    # Still up, and the sentinel's data unchanged; the audit chain intact.
    for name, process in target.stack.stack.group.services.items():
        assert process.process.poll() is None, f"{name} exited"
    ingest = target.stack.stack.group.services["ingest"]
    for address in (target.stack.stack.address, ingest.address):
        with grpc.insecure_channel(address) as health:
            reply = health_pb2_grpc.HealthStub(health).Check(
                health_pb2.HealthCheckRequest(), timeout=CALL_TIMEOUT_S
            )
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
    assert _state(target) == before
    records = all_audit_records(
        target.stack.faces,
        target.stack.metadata(),  # type: ignore[arg-type]
    )
    assert verify_chain(records).intact


# ---------------------------------------------------------------- found by fuzzing


def _refused(call: Callable[[], object]) -> grpc.RpcError:
    try:
        call()
    except grpc.RpcError as error:
        return error
    raise AssertionError("accepted")


def test_regressions_found_by_fuzzing_are_invalid_argument(target: Target) -> None:
    md = target.stack.metadata()
    faces, ingest = target.stack.faces, target.stack.ingest
    infinite = struct_pb2.Struct()
    infinite.update({"height": float("inf")})
    bad_time = common_pb2.TimeRange()
    bad_time.start_time.nanos = -1303
    far = I.StreamProcessor(collection="collections/fuzz")
    far.max_event_delay.seconds = 2**62
    cases = {
        # json_format cannot write an infinity: was INTERNAL.
        "subject.metadata": lambda: faces.CreateSubject(
            F.CreateSubjectRequest(
                parent="collections/fuzz",
                subject_id="infinite",
                subject=resources_pb2.Subject(metadata=infinite),
            ),
            metadata=md,
            timeout=CALL_TIMEOUT_S,
        ),
        # Negative nanos: Timestamp.ToMicroseconds raised ValueError, was INTERNAL.
        "filter.create_time_range.start_time": lambda: faces.ListAuditRecords(
            F.ListAuditRecordsRequest(filter=F.AuditRecordFilter(create_time_range=bad_time)),
            metadata=md,
            timeout=CALL_TIMEOUT_S,
        ),
        "filter.create_time_range": lambda: faces.ListFaces(
            F.ListFacesRequest(
                parent="collections/fuzz",
                filter=resources_pb2.FaceFilter(create_time_range=bad_time),
            ),
            metadata=md,
            timeout=CALL_TIMEOUT_S,
        ),
        # A Duration of 2**62 s overflowed timedelta: was INTERNAL.
        "stream_processor.max_event_delay": lambda: ingest.CreateStreamProcessor(
            I.CreateStreamProcessorRequest(stream_processor_id="far", stream_processor=far),
            metadata=md,
            timeout=CALL_TIMEOUT_S,
        ),
    }
    for field, call in cases.items():
        error = _refused(call)
        assert error.code() == C.INVALID_ARGUMENT, (field, error.details())
        assert any(name.startswith(field) for name in field_violations(error)), (
            field,
            field_violations(error),
        )
