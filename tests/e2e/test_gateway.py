"""End to end: every FaceService RPC through the gateway, with detection, embedding,
search and gateway as separate processes over real gRPC (embedded defaults), once with
in-process onnxruntime and once with inference through the real Triton server."""

from __future__ import annotations

import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from conftest import Stack
from facegrid.audit_chain import verify_chain
from facegrid.auth import create_token
from facegrid.internal.v1 import search_pb2, search_pb2_grpc
from facegrid.retention import EXPIRE_FACES
from facegrid.v1 import common_pb2, face_service_pb2, face_service_pb2_grpc, resources_pb2
from google.protobuf import duration_pb2, field_mask_pb2, struct_pb2
from grpc_helpers import error_info, error_reason, field_violations, jpeg_bytes, rpc_error

F = face_service_pb2
Purpose = common_pb2.IdentificationContext.Purpose
Outcome = F.ReviewDecision.Outcome
Reason = F.UnindexedReason
DEADLINE_S = 60.0
PEOPLE = ("alex_lacamoire", "biden", "kit_harington", "obama", "rose_leslie")
CONTEXT = common_pb2.IdentificationContext(
    purpose=Purpose.PURPOSE_TESTING, case_id="TEST-0001", justification="end-to-end test"
)
NO_FACE_JPEG = jpeg_bytes(np.full((240, 320, 3), 128, np.uint8))


class Client:
    """The FaceService stub with a deadline and a caller's token on every call."""

    def __init__(self, channel: grpc.Channel, stack: Stack, token: str | None = None) -> None:
        self._stub = face_service_pb2_grpc.FaceServiceStub(channel)
        self._metadata = stack.metadata(token)

    def __getattr__(self, method: str):  # type: ignore[no-untyped-def]
        call = getattr(self._stub, method)
        return lambda request: call(request, timeout=DEADLINE_S, metadata=self._metadata)


@pytest.fixture(scope="module")
def channel(e2e_stack: Stack) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(
        e2e_stack.address, options=[("grpc.max_send_message_length", 32 << 20)]
    ) as channel:
        yield channel


@pytest.fixture(scope="module")
def api(channel: grpc.Channel, e2e_stack: Stack) -> Client:
    return Client(channel, e2e_stack)


def photo(faces: Path, relative: str) -> bytes:
    return (faces / relative).read_bytes()


@pytest.fixture(scope="module")
def gallery(api: Client, faces: Path) -> dict[str, list[str]]:
    """A collection "gallery" with one subject per knn/train person and their faces."""
    api.CreateCollection(F.CreateCollectionRequest(collection_id="gallery"))
    enrolled: dict[str, list[str]] = {}
    for person in PEOPLE:
        api.CreateSubject(
            F.CreateSubjectRequest(
                parent="collections/gallery",
                subject_id=person,
                subject=_subject(display_name=person.replace("_", " ").title()),
            )
        )
        for path in sorted((faces / "knn" / "train" / person).iterdir()):
            reply = api.IndexFaces(
                F.IndexFacesRequest(
                    parent="collections/gallery",
                    image=path.read_bytes(),
                    subject_id=person,
                    external_image_id=path.name,
                )
            )
            assert len(reply.face_records) == 1, path
            enrolled.setdefault(person, []).append(reply.face_records[0].face.name)
    return enrolled


def _subject(**fields: str) -> object:
    from facegrid.v1 import resources_pb2

    return resources_pb2.Subject(**fields)


# ---------------------------------------------------------------- authorisation


def test_calls_without_valid_credentials_are_unauthenticated(
    channel: grpc.Channel, e2e_stack: Stack
) -> None:
    stub = face_service_pb2_grpc.FaceServiceStub(channel)
    request = F.ListCollectionsRequest()
    error = rpc_error(lambda: stub.ListCollections(request, timeout=DEADLINE_S))
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    wrong = (("authorization", "Bearer not-a-token"),)
    error = rpc_error(lambda: stub.ListCollections(request, timeout=DEADLINE_S, metadata=wrong))
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    # A revoked or mistyped token is not echoed back (nor logged: tests/e2e/test_secrets.py).
    unknown = "fgt_" + "x" * 43
    error = rpc_error(
        lambda: stub.ListCollections(
            request, timeout=DEADLINE_S, metadata=(("authorization", f"Bearer {unknown}"),)
        )
    )
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert unknown not in (error.details() or "")
    assert unknown.encode() not in (
        dict(error.trailing_metadata() or ()).get("grpc-status-details-bin") or b""
    )


def test_each_method_needs_its_scope(channel: grpc.Channel, e2e_stack: Stack) -> None:
    reader = Client(channel, e2e_stack, e2e_stack.tokens["facegrid.read"])
    reader.ListCollections(F.ListCollectionsRequest())
    error = rpc_error(
        lambda: reader.CreateCollection(F.CreateCollectionRequest(collection_id="not-allowed"))
    )
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    assert error_reason(error) == "MISSING_SCOPE"
    searcher = Client(channel, e2e_stack, e2e_stack.tokens["facegrid.search"])
    error = rpc_error(lambda: searcher.DetectFaces(F.DetectFacesRequest(image=NO_FACE_JPEG)))
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED


# ---------------------------------------------------------------- detection, comparison


def test_detect_faces_largest_first(api: Client, faces: Path) -> None:
    reply = api.DetectFaces(F.DetectFacesRequest(image=photo(faces, "misc/two_people.jpg")))
    assert len(reply.faces) == 2
    areas = [f.bounding_box.width * f.bounding_box.height for f in reply.faces]
    assert areas == sorted(areas, reverse=True)
    assert all(not f.HasField("chip") for f in reply.faces)
    assert reply.image_width == 1126
    assert reply.image_height == 661
    assert reply.model_version
    assert len(api.DetectFaces(F.DetectFacesRequest(image=NO_FACE_JPEG)).faces) == 0


def test_small_faces_are_found_when_asked_for(api: Client, crowds: Path) -> None:
    """dlib's 2008_002470.jpg: six faces 37-52 pixels wide, under the detector's own 80."""
    image = (crowds / "dlib" / "2008_002470.jpg").read_bytes()
    native = api.DetectFaces(F.DetectFacesRequest(image=image))
    assert native.min_face_size == 80
    assert len(native.faces) <= 1
    small = api.DetectFaces(F.DetectFacesRequest(image=image, min_face_size=20))
    assert small.min_face_size <= 21
    assert len(small.faces) == 6
    error = rpc_error(lambda: api.DetectFaces(F.DetectFacesRequest(image=image, min_face_size=5)))
    assert "min_face_size" in field_violations(error)
    api.CreateCollection(F.CreateCollectionRequest(collection_id="crowd"))
    # The same photo at half size: six faces of about 21 pixels, found only at 20.
    half = _resized(image, 0.5)
    indexed = api.IndexFaces(
        F.IndexFacesRequest(
            parent="collections/crowd",
            image=half,
            min_face_size=20,
            quality_filter=common_pb2.QUALITY_FILTER_NONE,
        )
    )
    assert indexed.min_face_size <= 21
    assert len(indexed.face_records) == 6
    # The default filter refuses faces under 40 px (unreliable embeddings), saying why.
    filtered = api.IndexFaces(
        F.IndexFacesRequest(parent="collections/crowd", image=half, min_face_size=20)
    )
    assert not filtered.face_records
    assert len(filtered.unindexed_faces) == 6
    assert all(
        Reason.UNINDEXED_REASON_SMALL_BOUNDING_BOX in u.reasons for u in filtered.unindexed_faces
    )
    api.DeleteCollection(F.DeleteCollectionRequest(name="collections/crowd", force=True))


def test_bad_image_is_invalid_argument_and_the_gateway_stays_up(api: Client) -> None:
    for image in (b"", b"not an image", NO_FACE_JPEG[: len(NO_FACE_JPEG) // 2]):
        error = rpc_error(lambda image=image: api.DetectFaces(F.DetectFacesRequest(image=image)))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "image" in field_violations(error)
    error = rpc_error(lambda: api.DetectFaces(F.DetectFacesRequest(image=b"x", max_faces=101)))
    assert "max_faces" in field_violations(error)
    api.ListCollections(F.ListCollectionsRequest())


def test_compare_faces(api: Client, faces: Path) -> None:
    reply = api.CompareFaces(
        F.CompareFacesRequest(
            source_image=photo(faces, "misc/obama.jpg"),
            target_image=photo(faces, "knn/test/obama_and_biden.jpg"),
            context=CONTEXT,
        )
    )
    assert len(reply.face_matches) == 1
    match = reply.face_matches[0]
    assert match.similarity >= reply.threshold.applied == match.threshold_applied
    assert match.model_version == reply.model_version != ""
    assert 0.0 <= match.distance <= 2.0
    assert len(reply.unmatched_faces) == 2
    assert reply.audit_record.startswith("auditRecords/")
    # The similarity is the calibrated value of the cosine, on 0-100.
    assert 0 <= match.similarity <= 100
    assert -1 <= match.cosine_similarity <= 1


def test_compare_faces_errors(api: Client, faces: Path) -> None:
    error = rpc_error(
        lambda: api.CompareFaces(
            F.CompareFacesRequest(
                source_image=NO_FACE_JPEG,
                target_image=photo(faces, "misc/obama.jpg"),
                context=CONTEXT,
            )
        )
    )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "source_image" in field_violations(error)
    assert error_reason(error) == "NO_FACE"
    error = rpc_error(
        lambda: api.CompareFaces(
            F.CompareFacesRequest(
                source_image=photo(faces, "misc/obama.jpg"), target_image=b"junk", context=CONTEXT
            )
        )
    )
    assert "target_image" in field_violations(error)


# ---------------------------------------------------------------- collections


def test_collection_lifecycle(api: Client) -> None:
    created = api.CreateCollection(
        F.CreateCollectionRequest(
            collection_id="lifecycle",
            collection=_collection(display_name="Lifecycle", description="test"),
        )
    ).collection
    assert created.name == "collections/lifecycle"
    assert created.model_version
    assert created.dimension == 128
    assert len(created.similarity_calibration.points) >= 2
    error = rpc_error(
        lambda: api.CreateCollection(F.CreateCollectionRequest(collection_id="lifecycle"))
    )
    assert error.code() == grpc.StatusCode.ALREADY_EXISTS
    error = rpc_error(
        lambda: api.CreateCollection(F.CreateCollectionRequest(collection_id="Bad_Id"))
    )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    got = api.GetCollection(F.GetCollectionRequest(name="collections/lifecycle")).collection
    assert got.display_name == "Lifecycle"
    assert got.face_count == 0
    listed = api.ListCollections(F.ListCollectionsRequest(page_size=1000)).collections
    assert "collections/lifecycle" in [c.name for c in listed]
    api.DeleteCollection(F.DeleteCollectionRequest(name="collections/lifecycle"))
    error = rpc_error(
        lambda: api.GetCollection(F.GetCollectionRequest(name="collections/lifecycle"))
    )
    assert error.code() == grpc.StatusCode.NOT_FOUND


def _collection(**fields: object) -> resources_pb2.Collection:
    return resources_pb2.Collection(**fields)  # type: ignore[arg-type]


# ---------------------------------------------------------------- indexing


def test_index_faces_reports_indexed_and_unindexed(api: Client, faces: Path) -> None:
    api.CreateCollection(F.CreateCollectionRequest(collection_id="indexing"))
    image = photo(faces, "knn/test/obama_and_biden.jpg")
    metadata = struct_pb2.Struct()
    metadata.update({"booking": "B-17", "officer": 42})
    reply = api.IndexFaces(
        F.IndexFacesRequest(
            parent="collections/indexing",
            image=image,
            max_faces=1,
            external_image_id="obama_and_biden.jpg",
            source_id="camera-7",
            metadata=metadata,
        )
    )
    assert len(reply.face_records) == 1
    record = reply.face_records[0]
    assert record.face.external_image_id == "obama_and_biden.jpg"
    assert record.face.source_id == "camera-7"
    assert record.face.metadata["booking"] == "B-17"
    assert record.face.image_id == reply.image_id
    assert not record.face.HasField("embedding")
    assert [list(u.reasons) for u in reply.unindexed_faces] == [
        [Reason.UNINDEXED_REASON_EXCEEDS_MAX_FACES]
    ] * (len(reply.unindexed_faces))
    assert len(reply.unindexed_faces) >= 1
    # The strict filter turns the small, unenrolled face away with its reasons.
    strict = api.IndexFaces(
        F.IndexFacesRequest(
            parent="collections/indexing",
            image=image,
            quality_filter=common_pb2.QUALITY_FILTER_HIGH,
        )
    )
    assert strict.unindexed_faces, "expected the HIGH filter to refuse a face"
    for unindexed in strict.unindexed_faces:
        assert unindexed.reasons
        assert Reason.UNINDEXED_REASON_EXCEEDS_MAX_FACES not in unindexed.reasons
    # No face: not an error, both lists empty.
    empty = api.IndexFaces(F.IndexFacesRequest(parent="collections/indexing", image=NO_FACE_JPEG))
    assert not empty.face_records
    assert not empty.unindexed_faces


def test_index_faces_is_idempotent_with_a_request_id(api: Client, faces: Path) -> None:
    api.CreateCollection(F.CreateCollectionRequest(collection_id="retries"))
    request = F.IndexFacesRequest(
        parent="collections/retries",
        image=photo(faces, "misc/two_people.jpg"),
        request_id=str(uuid.uuid4()),
    )
    first = api.IndexFaces(request)
    second = api.IndexFaces(request)
    assert [r.face.name for r in first.face_records] == [r.face.name for r in second.face_records]
    count = api.GetCollection(F.GetCollectionRequest(name="collections/retries")).collection
    assert count.face_count == len(first.face_records) == 2


def test_index_faces_errors(api: Client, faces: Path) -> None:
    image = photo(faces, "misc/obama.jpg")
    error = rpc_error(
        lambda: api.IndexFaces(F.IndexFacesRequest(parent="collections/nowhere", image=image))
    )
    assert error.code() == grpc.StatusCode.NOT_FOUND
    error = rpc_error(lambda: api.IndexFaces(F.IndexFacesRequest(parent="nowhere", image=image)))
    assert "parent" in field_violations(error)
    api.CreateCollection(F.CreateCollectionRequest(collection_id="index-errors"))
    parent = "collections/index-errors"
    error = rpc_error(
        lambda: api.IndexFaces(F.IndexFacesRequest(parent=parent, image=image, subject_id="ghost"))
    )
    assert error.code() == grpc.StatusCode.NOT_FOUND
    error = rpc_error(
        lambda: api.IndexFaces(
            F.IndexFacesRequest(parent=parent, image=image, external_image_id="a b/c")
        )
    )
    assert "external_image_id" in field_violations(error)
    error = rpc_error(
        lambda: api.IndexFaces(F.IndexFacesRequest(parent=parent, image=image, request_id="x"))
    )
    assert "request_id" in field_violations(error)
    error = rpc_error(lambda: api.IndexFaces(F.IndexFacesRequest(parent=parent, image=b"junk")))
    assert "image" in field_violations(error)
    count = api.GetCollection(F.GetCollectionRequest(name=parent)).collection.face_count
    assert count == 0


# ---------------------------------------------------------------- search


def test_search_faces_by_image_finds_the_right_person(
    api: Client, faces: Path, gallery: dict[str, list[str]]
) -> None:
    probes = {"obama1.jpg": "obama", "alex_lacamoire1.jpg": "alex_lacamoire"}
    probes["johnsnow_test1.jpg"] = "kit_harington"
    for probe, person in probes.items():
        reply = api.SearchFacesByImage(
            F.SearchFacesByImageRequest(
                parent="collections/gallery",
                image=photo(faces, f"knn/test/{probe}"),
                context=CONTEXT,
            )
        )
        assert reply.face_matches, probe
        best = reply.face_matches[0]
        assert best.face.subject_id == person, probe
        assert best.face.name in gallery[person]
        assert best.similarity >= reply.threshold.applied
        assert best.threshold_applied == reply.threshold.applied
        assert best.model_version == reply.model_version
        assert not best.face.HasField("embedding")
        sims = [m.similarity for m in reply.face_matches]
        assert sims == sorted(sims, reverse=True)
        assert reply.detected_face_count == 1
        assert reply.searched_face.bounding_box.width > 0
        assert reply.audit_record.startswith("auditRecords/")


def test_a_caller_cannot_lower_the_threshold(
    api: Client, faces: Path, gallery: dict[str, list[str]]
) -> None:
    image = photo(faces, "knn/test/obama1.jpg")
    lowered = api.SearchFacesByImage(
        F.SearchFacesByImageRequest(
            parent="collections/gallery",
            image=image,
            context=CONTEXT,
            face_match_threshold=0.0,
            max_faces=100,
        )
    )
    threshold = lowered.threshold
    assert threshold.requested == 0.0
    assert threshold.applied == threshold.minimum > 0
    assert all(m.similarity >= threshold.minimum for m in lowered.face_matches)
    raised = api.SearchFacesByImage(
        F.SearchFacesByImageRequest(
            parent="collections/gallery",
            image=image,
            context=CONTEXT,
            face_match_threshold=99.99,
        )
    )
    assert raised.threshold.applied == pytest.approx(99.99)
    assert all(m.similarity >= 99.99 for m in raised.face_matches)


def test_the_unenrolled_person_is_not_a_candidate(
    api: Client, faces: Path, gallery: dict[str, list[str]]
) -> None:
    image = photo(faces, "knn/test/obama_and_biden.jpg")
    detected = api.DetectFaces(F.DetectFacesRequest(image=image)).faces
    smallest = detected[-1].bounding_box
    crop = _crop(image, smallest)
    error_or_reply = api.SearchFacesByImage(
        F.SearchFacesByImageRequest(
            parent="collections/gallery",
            image=crop,
            context=CONTEXT,
            quality_filter=common_pb2.QUALITY_FILTER_NONE,
        )
    )
    assert list(error_or_reply.face_matches) == []


def _resized(image: bytes, scale: float) -> bytes:
    import io

    from PIL import Image

    pixels = Image.open(io.BytesIO(image)).convert("RGB")
    size = (round(pixels.width * scale), round(pixels.height * scale))
    return jpeg_bytes(np.asarray(pixels.resize(size)))


def _crop(image: bytes, box: common_pb2.BoundingBox) -> bytes:
    import io

    from PIL import Image

    pixels = Image.open(io.BytesIO(image)).convert("RGB")
    margin = box.width
    region = (
        max(0, box.left - margin),
        max(0, box.top - margin),
        box.left + box.width + margin,
        box.top + box.height + margin,
    )
    return jpeg_bytes(np.asarray(pixels.crop(region)))


def test_identification_needs_purpose_and_case(
    api: Client, faces: Path, gallery: dict[str, list[str]]
) -> None:
    image = photo(faces, "knn/test/obama1.jpg")
    for context, fields in (
        (None, {"context.purpose", "context.case_id"}),
        (common_pb2.IdentificationContext(case_id="C-1"), {"context.purpose"}),
        (
            common_pb2.IdentificationContext(purpose=Purpose.PURPOSE_TESTING),
            {"context.case_id"},
        ),
    ):
        request = F.SearchFacesByImageRequest(parent="collections/gallery", image=image)
        if context is not None:
            request.context.CopyFrom(context)
        error = rpc_error(lambda request=request: api.SearchFacesByImage(request))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert set(field_violations(error)) == fields
    for call in (
        lambda: api.SearchFaces(F.SearchFacesRequest(face=gallery["obama"][0])),
        lambda: api.SearchSubjectsByImage(
            F.SearchSubjectsByImageRequest(parent="collections/gallery", image=image)
        ),
        lambda: api.CompareFaces(F.CompareFacesRequest(source_image=image, target_image=image)),
    ):
        assert rpc_error(call).code() == grpc.StatusCode.INVALID_ARGUMENT


def test_search_by_image_errors(api: Client, faces: Path, gallery: dict[str, list[str]]) -> None:
    image = photo(faces, "knn/test/obama1.jpg")
    error = rpc_error(
        lambda: api.SearchFacesByImage(
            F.SearchFacesByImageRequest(
                parent="collections/gallery", image=NO_FACE_JPEG, context=CONTEXT
            )
        )
    )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_reason(error) == "NO_FACE"
    assert "image" in field_violations(error)
    error = rpc_error(
        lambda: api.SearchFacesByImage(
            F.SearchFacesByImageRequest(parent="collections/nowhere", image=image, context=CONTEXT)
        )
    )
    assert error.code() == grpc.StatusCode.NOT_FOUND
    error = rpc_error(
        lambda: api.SearchFacesByImage(
            F.SearchFacesByImageRequest(
                parent="collections/gallery", image=b"\xff\xd8junk", context=CONTEXT
            )
        )
    )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "image" in field_violations(error)
    # Several faces where one is expected: the largest is searched, never a smaller one;
    # if it fails the quality filter the call fails rather than searching another.
    several = photo(faces, "knn/test/obama_and_biden.jpg")
    reply = api.SearchFacesByImage(
        F.SearchFacesByImageRequest(parent="collections/gallery", image=several, context=CONTEXT)
    )
    assert reply.detected_face_count == 3
    detected = api.DetectFaces(F.DetectFacesRequest(image=several)).faces
    assert reply.searched_face.bounding_box == detected[0].bounding_box
    error = rpc_error(
        lambda: api.SearchFacesByImage(
            F.SearchFacesByImageRequest(
                parent="collections/gallery",
                image=photo(faces, "knn/test/kit_with_rose.jpg"),
                context=CONTEXT,
                quality_filter=common_pb2.QUALITY_FILTER_HIGH,
            )
        )
    )
    # Both faces there are under HIGH's 100 pixels; the larger one is refused, and no
    # other face is searched in its place.
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_reason(error) == "FACE_QUALITY"
    assert "too small" in field_violations(error)["image"]
    assert error_info(error).metadata["measures"] == "face_size"


def test_results_say_how_many_false_candidates_to_expect(
    api: Client, faces: Path, gallery: dict[str, list[str]]
) -> None:
    reply = api.SearchFacesByImage(
        F.SearchFacesByImageRequest(
            parent="collections/gallery",
            image=photo(faces, "knn/test/obama1.jpg"),
            context=CONTEXT,
            max_faces=50,
        )
    )
    threshold = reply.threshold
    stored = sum(len(v) for v in gallery.values())
    assert threshold.compared_face_count == stored
    # Similarity 80: the measured FMR's upper 95% bound is at most 1e-4 (lfw-dev).
    assert 0 < threshold.false_match_rate <= threshold.false_match_rate_upper_bound <= 1e-4
    assert threshold.expected_false_candidates == pytest.approx(threshold.false_match_rate * stored)
    assert threshold.expected_false_candidates_upper_bound == pytest.approx(
        threshold.false_match_rate_upper_bound * stored
    )
    assert reply.face_matches
    rates = [m.false_match_rate for m in reply.face_matches]
    assert all(r <= threshold.false_match_rate for r in rates)
    assert rates == sorted(rates)  # more similar, rarer among strangers
    assert all(m.false_match_rate <= m.false_match_rate_upper_bound for m in reply.face_matches)
    record = api.GetAuditRecord(F.GetAuditRecordRequest(name=reply.audit_record)).audit_record
    assert record.threshold == threshold
    assert list(record.result_false_match_rates) == pytest.approx(rates)
    assert list(record.result_similarities) == pytest.approx(
        [m.similarity for m in reply.face_matches]
    )
    by_face = api.SearchFaces(F.SearchFacesRequest(face=gallery["obama"][0], context=CONTEXT))
    assert by_face.threshold.compared_face_count == stored - 1
    subjects = api.SearchSubjectsByImage(
        F.SearchSubjectsByImageRequest(
            parent="collections/gallery", image=photo(faces, "knn/test/obama1.jpg"), context=CONTEXT
        )
    )
    assert subjects.threshold.compared_face_count == stored
    assert subjects.subject_matches[0].best_face_match.false_match_rate_upper_bound > 0
    compared = api.CompareFaces(
        F.CompareFacesRequest(
            source_image=photo(faces, "misc/obama.jpg"),
            target_image=photo(faces, "knn/test/obama_and_biden.jpg"),
            context=CONTEXT,
        )
    )
    assert compared.threshold.compared_face_count >= 2
    assert compared.threshold.false_match_rate > 0
    assert all(0 <= m.false_match_rate <= 1e-4 for m in compared.face_matches)


def test_watch_list_monitoring_has_the_stricter_default(
    api: Client, faces: Path, gallery: dict[str, list[str]]
) -> None:
    watch = common_pb2.IdentificationContext(
        purpose=Purpose.PURPOSE_WATCHLIST_MONITORING, case_id="WL-1"
    )
    reply = api.SearchFacesByImage(
        F.SearchFacesByImageRequest(
            parent="collections/gallery",
            image=photo(faces, "knn/test/obama1.jpg"),
            context=watch,
            face_match_threshold=85.0,
        )
    )
    assert (reply.threshold.minimum, reply.threshold.applied) == (90.0, 90.0)
    assert reply.threshold.false_match_rate_upper_bound <= 1e-5
    assert all(m.similarity >= 90.0 for m in reply.face_matches)


def test_a_collection_minimum_threshold_set_by_the_administrator(
    api: Client, channel: grpc.Channel, e2e_stack: Stack, faces: Path
) -> None:
    created = api.CreateCollection(
        F.CreateCollectionRequest(
            collection_id="strict", collection=_collection(min_match_threshold=85.0)
        )
    ).collection
    assert created.min_match_threshold == pytest.approx(85.0)
    api.IndexFaces(
        F.IndexFacesRequest(
            parent="collections/strict", image=photo(faces, "knn/train/obama/obama.jpg")
        )
    )

    def search(requested: float | None = None) -> common_pb2.MatchThreshold:
        request = F.SearchFacesByImageRequest(
            parent="collections/strict", image=photo(faces, "knn/test/obama1.jpg"), context=CONTEXT
        )
        if requested is not None:
            request.face_match_threshold = requested
        return api.SearchFacesByImage(request).threshold

    threshold = search(70.0)
    assert (threshold.minimum, threshold.collection_minimum, threshold.applied) == (
        85.0,
        85.0,
        85.0,
    )

    def update(minimum: float | None, *paths: str) -> F.UpdateCollectionResponse:
        collection = _collection(name="collections/strict")
        if minimum is not None:
            collection.min_match_threshold = minimum
        return api.UpdateCollection(
            F.UpdateCollectionRequest(
                collection=collection, update_mask=field_mask_pb2.FieldMask(paths=list(paths))
            )
        )

    updated = update(92.0, "min_match_threshold").collection
    assert updated.min_match_threshold == pytest.approx(92.0)
    assert updated.face_count == 1
    assert search().applied == pytest.approx(92.0)
    update(None, "min_match_threshold")
    cleared = search()
    assert not cleared.HasField("collection_minimum")
    assert cleared.minimum == 80.0
    # Never below the deployment's minimum, neither at creation nor later.
    for call in (
        lambda: update(60.0, "min_match_threshold"),
        lambda: api.CreateCollection(
            F.CreateCollectionRequest(
                collection_id="lax", collection=_collection(min_match_threshold=60.0)
            )
        ),
        lambda: update(90.0, "face_count"),
        lambda: update(90.0),
    ):
        error = rpc_error(call)
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    reader = Client(channel, e2e_stack, e2e_stack.tokens["facegrid.read"])
    error = rpc_error(
        lambda: reader.UpdateCollection(
            F.UpdateCollectionRequest(
                collection=_collection(name="collections/strict"),
                update_mask=field_mask_pb2.FieldMask(paths=["min_match_threshold"]),
            )
        )
    )
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    records = api.ListAuditRecords(
        F.ListAuditRecordsRequest(
            filter=F.AuditRecordFilter(
                collection="collections/strict",
                method="/facegrid.v1.FaceService/UpdateCollection",
            )
        )
    ).audit_records
    assert [r.threshold.collection_minimum for r in records if r.status_code == 0][:1] == [
        pytest.approx(92.0)
    ]
    api.DeleteCollection(F.DeleteCollectionRequest(name="collections/strict", force=True))


def test_a_probe_too_blurred_or_dark_is_refused_whatever_the_filter(
    api: Client, faces: Path, gallery: dict[str, list[str]]
) -> None:
    import io

    from PIL import Image, ImageFilter

    original = Image.open(io.BytesIO(photo(faces, "knn/test/obama1.jpg"))).convert("RGB")
    blurred = jpeg_bytes(np.asarray(original.filter(ImageFilter.GaussianBlur(6))))
    dark = jpeg_bytes((np.asarray(original).astype(np.float32) * 0.08).astype(np.uint8))
    for image, measure in ((blurred, "sharpness"), (dark, "brightness")):
        detected = api.DetectFaces(F.DetectFacesRequest(image=image)).faces
        assert detected, measure  # still a face, just not one to search with
        error = rpc_error(
            lambda image=image: api.SearchFacesByImage(
                F.SearchFacesByImageRequest(
                    parent="collections/gallery",
                    image=image,
                    context=CONTEXT,
                    quality_filter=common_pb2.QUALITY_FILTER_NONE,
                )
            )
        )
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert error_reason(error) == "FACE_QUALITY"
        assert measure in error_info(error).metadata["measures"].split(",")
        assert "cannot be searched reliably" in field_violations(error)["image"]


def test_search_faces_by_stored_face(api: Client, gallery: dict[str, list[str]]) -> None:
    obama = gallery["obama"]
    reply = api.SearchFaces(F.SearchFacesRequest(face=obama[0], context=CONTEXT))
    assert reply.searched_face == obama[0]
    found = [m.face.name for m in reply.face_matches]
    assert obama[0] not in found
    assert found[:1] == [obama[1]]
    error = rpc_error(
        lambda: api.SearchFaces(
            F.SearchFacesRequest(face=f"collections/gallery/faces/{uuid.uuid4()}", context=CONTEXT)
        )
    )
    assert error.code() == grpc.StatusCode.NOT_FOUND
    error = rpc_error(lambda: api.SearchFaces(F.SearchFacesRequest(face="x", context=CONTEXT)))
    assert "face" in field_violations(error)


def test_search_subjects_by_image_ranks_subjects(
    api: Client, faces: Path, gallery: dict[str, list[str]]
) -> None:
    reply = api.SearchSubjectsByImage(
        F.SearchSubjectsByImageRequest(
            parent="collections/gallery",
            image=photo(faces, "knn/test/kit_with_rose.jpg"),
            context=CONTEXT,
            max_subjects=5,
        )
    )
    assert reply.detected_face_count == 2
    assert reply.subject_matches
    names = [m.subject.name for m in reply.subject_matches]
    assert len(names) == len(set(names))
    best = reply.subject_matches[0]
    assert best.subject.subject_id in ("kit_harington", "rose_leslie")
    assert best.similarity == best.best_face_match.similarity
    assert best.best_face_match.face.subject_id == best.subject.subject_id
    assert best.subject.display_name
    assert best.subject.face_count >= 1


# ---------------------------------------------------------------- faces and subjects


def test_list_and_get_faces(api: Client, gallery: dict[str, list[str]]) -> None:
    names: list[str] = []
    token = ""
    while True:
        page = api.ListFaces(
            F.ListFacesRequest(parent="collections/gallery", page_size=3, page_token=token)
        )
        names += [f.name for f in page.faces]
        assert all(not f.HasField("embedding") for f in page.faces)
        token = page.next_page_token
        if not token:
            break
    assert sorted(names) == sorted(n for faces in gallery.values() for n in faces)
    only_biden = api.ListFaces(
        F.ListFacesRequest(parent="collections/gallery", filter=_filter(subject_ids=["biden"]))
    ).faces
    assert sorted(f.name for f in only_biden) == sorted(gallery["biden"])
    face = api.GetFace(F.GetFaceRequest(name=gallery["obama"][0])).face
    assert face.subject_id == "obama"
    assert not face.HasField("embedding")
    error = rpc_error(
        lambda: api.ListFaces(F.ListFacesRequest(parent="collections/gallery", page_size=-1))
    )
    assert "page_size" in field_violations(error)


def _filter(**fields: list[str]) -> object:
    from facegrid.v1 import resources_pb2

    return resources_pb2.FaceFilter(**fields)


def test_subjects(api: Client, faces: Path) -> None:
    api.CreateCollection(F.CreateCollectionRequest(collection_id="subjects"))
    parent = "collections/subjects"
    indexed = api.IndexFaces(
        F.IndexFacesRequest(parent=parent, image=photo(faces, "misc/two_people.jpg"))
    )
    face_names = [r.face.name for r in indexed.face_records]
    subject = api.CreateSubject(
        F.CreateSubjectRequest(parent=parent, subject_id="P-1", subject=_subject(display_name="P"))
    ).subject
    assert subject.name == f"{parent}/subjects/P-1"
    assert subject.face_count == 0
    error = rpc_error(
        lambda: api.CreateSubject(F.CreateSubjectRequest(parent=parent, subject_id="P-1"))
    )
    assert error.code() == grpc.StatusCode.ALREADY_EXISTS
    after = api.AssociateFaces(F.AssociateFacesRequest(subject=subject.name, faces=face_names))
    assert after.subject.face_count == 2
    got = api.GetSubject(F.GetSubjectRequest(name=subject.name)).subject
    assert got.face_count == 2
    after = api.DisassociateFaces(
        F.DisassociateFacesRequest(subject=subject.name, faces=face_names[:1])
    )
    assert after.subject.face_count == 1
    listed = api.ListSubjects(F.ListSubjectsRequest(parent=parent)).subjects
    assert [s.name for s in listed] == [subject.name]
    error = rpc_error(lambda: api.DeleteSubject(F.DeleteSubjectRequest(name=subject.name)))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    deleted = api.DeleteSubject(F.DeleteSubjectRequest(name=subject.name, force=True))
    assert deleted.deleted_face_count == 1
    remaining = [f.name for f in api.ListFaces(F.ListFacesRequest(parent=parent)).faces]
    assert remaining == face_names[:1]
    error = rpc_error(
        lambda: api.AssociateFaces(
            F.AssociateFacesRequest(subject=f"{parent}/subjects/ghost", faces=face_names[:1])
        )
    )
    assert error.code() == grpc.StatusCode.NOT_FOUND


def test_a_deleted_face_never_comes_back(
    api: Client, faces: Path, e2e_stack: Stack, gallery: dict[str, list[str]]
) -> None:
    api.CreateCollection(F.CreateCollectionRequest(collection_id="deletion"))
    parent = "collections/deletion"
    image = photo(faces, "knn/test/obama1.jpg")
    indexed = api.IndexFaces(F.IndexFacesRequest(parent=parent, image=image))
    face = indexed.face_records[0].face.name
    search = F.SearchFacesByImageRequest(parent=parent, image=image, context=CONTEXT)
    assert [m.face.name for m in api.SearchFacesByImage(search).face_matches] == [face]
    deleted = api.BatchDeleteFaces(F.BatchDeleteFacesRequest(parent=parent, names=[face]))
    assert list(deleted.deleted_faces) == [face]
    assert list(api.SearchFacesByImage(search).face_matches) == []
    assert rpc_error(lambda: api.GetFace(F.GetFaceRequest(name=face))).code() == (
        grpc.StatusCode.NOT_FOUND
    )
    error = rpc_error(
        lambda: api.BatchDeleteFaces(F.BatchDeleteFacesRequest(parent=parent, names=[face]))
    )
    assert error.code() == grpc.StatusCode.NOT_FOUND
    again = api.BatchDeleteFaces(
        F.BatchDeleteFacesRequest(parent=parent, names=[face], allow_missing=True)
    )
    assert list(again.deleted_faces) == []
    # Not after a restart of the search service either.
    e2e_stack.group.restart("search")
    _wait_until_reachable(api, parent)
    assert list(api.SearchFacesByImage(search).face_matches) == []
    assert api.GetCollection(F.GetCollectionRequest(name=parent)).collection.face_count == 0
    found = api.SearchFacesByImage(
        F.SearchFacesByImageRequest(parent="collections/gallery", image=image, context=CONTEXT)
    )
    assert found.face_matches[0].face.subject_id == "obama"


def test_faces_past_the_collections_retention_are_removed_and_audited(
    api: Client, faces: Path, e2e_stack: Stack
) -> None:
    too_short = rpc_error(
        lambda: api.CreateCollection(
            F.CreateCollectionRequest(
                collection_id="short-retention",
                collection=resources_pb2.Collection(
                    face_retention=duration_pb2.Duration(seconds=1800)
                ),
            )
        )
    )
    assert too_short.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "collection.face_retention" in field_violations(too_short)
    name = f"retained-{uuid.uuid4().hex[:8]}"
    parent = f"collections/{name}"
    created = api.CreateCollection(
        F.CreateCollectionRequest(
            collection_id=name,
            collection=resources_pb2.Collection(face_retention=duration_pb2.Duration(seconds=7200)),
        )
    ).collection
    assert created.face_retention.seconds == 7200
    # The administrator may change it later, within the same bounds.
    mask = field_mask_pb2.FieldMask(paths=["face_retention"])
    longer = api.UpdateCollection(
        F.UpdateCollectionRequest(
            collection=resources_pb2.Collection(
                name=f"collections/{name}", face_retention=duration_pb2.Duration(seconds=10800)
            ),
            update_mask=mask,
        )
    ).collection
    assert longer.face_retention.seconds == 10800
    too_short = rpc_error(
        lambda: api.UpdateCollection(
            F.UpdateCollectionRequest(
                collection=resources_pb2.Collection(
                    name=f"collections/{name}", face_retention=duration_pb2.Duration(seconds=60)
                ),
                update_mask=mask,
            )
        )
    )
    assert "collection.face_retention" in field_violations(too_short)
    fresh = (
        api.IndexFaces(
            F.IndexFacesRequest(parent=parent, image=photo(faces, "knn/test/obama1.jpg"))
        )
        .face_records[0]
        .face
    )
    # Faces enrolled four hours ago (the gateway stamps create_time; SearchService takes
    # it as given): past the three-hour retention.
    search_channel = grpc.insecure_channel(e2e_stack.group.services["search"].address)
    search = search_pb2_grpc.SearchServiceStub(search_channel)
    rng = np.random.default_rng(5)
    old = []
    for _ in range(3):
        vector = rng.normal(size=created.dimension).astype(np.float32)
        face = resources_pb2.Face(
            name=f"{parent}/faces/{uuid.uuid4()}",
            embedding=common_pb2.Embedding(values=(vector / np.linalg.norm(vector)).tolist()),
            model_version=created.model_version,
        )
        face.create_time.FromSeconds(int(time.time()) - 4 * 3600)
        old.append(face)
    search.BatchUpsertFaces(
        search_pb2.BatchUpsertFacesRequest(parent=parent, faces=old),
        timeout=DEADLINE_S,
    )
    search_channel.close()
    # The gateway sweeps every second here (gateway.retention_interval_s=1).
    deadline = time.monotonic() + 30
    while True:
        listed = api.ListFaces(F.ListFacesRequest(parent=parent)).faces
        if [f.name for f in listed] == [fresh.name] or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert [f.name for f in listed] == [fresh.name]
    for face in old:
        error = rpc_error(lambda face=face: api.GetFace(F.GetFaceRequest(name=face.name)))
        assert error.code() == grpc.StatusCode.NOT_FOUND
    records = api.ListAuditRecords(
        F.ListAuditRecordsRequest(
            filter=F.AuditRecordFilter(method=EXPIRE_FACES, collection=parent)
        )
    ).audit_records
    assert [(r.principal, r.result_count) for r in records] == [("facegrid:retention", 3)]
    assert api.GetCollection(F.GetCollectionRequest(name=parent)).collection.face_count == 1


def _wait_until_reachable(api: Client, collection: str) -> None:
    """The gateway reconnects to a restarted service within about a second."""
    deadline = time.monotonic() + 15
    while True:
        try:
            api.GetCollection(F.GetCollectionRequest(name=collection))
            return
        except grpc.RpcError as error:
            if error.code() != grpc.StatusCode.UNAVAILABLE or time.monotonic() > deadline:
                raise
            time.sleep(0.2)


# ---------------------------------------------------------------- audit


def test_purposes_are_limited_per_caller_and_testing_is_refused_on_production(
    api: Client, channel: grpc.Channel, e2e_stack: Stack, faces: Path
) -> None:
    name = f"prod-{uuid.uuid4().hex[:8]}"
    api.CreateCollection(
        F.CreateCollectionRequest(
            collection_id=name, collection=resources_pb2.Collection(production=True)
        )
    )
    parent = f"collections/{name}"
    image = photo(faces, "knn/test/obama1.jpg")
    api.IndexFaces(F.IndexFacesRequest(parent=parent, image=image))

    def search(client: Client, purpose: int) -> F.SearchFacesByImageResponse:
        context = common_pb2.IdentificationContext(purpose=purpose, case_id="CASE-P")
        return client.SearchFacesByImage(
            F.SearchFacesByImageRequest(parent=parent, image=image, context=context)
        )

    refused = rpc_error(lambda: search(api, Purpose.PURPOSE_TESTING))
    assert refused.code() == grpc.StatusCode.PERMISSION_DENIED
    assert error_reason(refused) == "PURPOSE_NOT_ALLOWED"
    assert search(api, Purpose.PURPOSE_CRIMINAL_INVESTIGATION).face_matches
    api.UpdateCollection(
        F.UpdateCollectionRequest(
            collection=resources_pb2.Collection(name=parent, production=False),
            update_mask=field_mask_pb2.FieldMask(paths=["production"]),
        )
    )
    assert search(api, Purpose.PURPOSE_TESTING).face_matches
    # A caller the administrator allows one purpose (added, then SIGHUP: no restart).
    token = create_token(
        e2e_stack.work_dir / "credentials.json",
        f"missing-persons-{uuid.uuid4().hex[:6]}",
        ["facegrid.search"],
        ["PURPOSE_MISSING_PERSON"],
    )
    e2e_stack.group.services["gateway"].process.send_signal(signal.SIGHUP)
    limited = Client(channel, e2e_stack, token)
    deadline = time.monotonic() + 10
    while True:
        try:
            assert search(limited, Purpose.PURPOSE_MISSING_PERSON).face_matches
            break
        except grpc.RpcError as error:
            code = error.code()
        assert code == grpc.StatusCode.UNAUTHENTICATED  # not yet re-read
        assert time.monotonic() < deadline, "the gateway did not re-read its callers"
        time.sleep(0.2)
    denied = rpc_error(lambda: search(limited, Purpose.PURPOSE_CRIMINAL_INVESTIGATION))
    assert denied.code() == grpc.StatusCode.PERMISSION_DENIED
    assert error_reason(denied) == "PURPOSE_NOT_ALLOWED"
    records = api.ListAuditRecords(
        F.ListAuditRecordsRequest(filter=F.AuditRecordFilter(case_id="CASE-P"))
    ).audit_records
    codes = [r.status_code for r in records]
    assert codes.count(grpc.StatusCode.PERMISSION_DENIED.value[0]) == 2  # both on record
    api.DeleteCollection(F.DeleteCollectionRequest(name=parent, force=True))


def test_a_retried_search_is_recorded_once(
    api: Client, faces: Path, gallery: dict[str, list[str]]
) -> None:
    """A search whose reply was lost is sent again with its request_id: answered the
    same, it is on the record once; a different image under that id is a new record."""
    image = photo(faces, "knn/test/obama1.jpg")
    case = f"CASE-{uuid.uuid4().hex[:8]}"
    context = common_pb2.IdentificationContext(
        purpose=Purpose.PURPOSE_CRIMINAL_INVESTIGATION, case_id=case, justification="retry"
    )
    request_id = str(uuid.uuid4())
    request = F.SearchFacesByImageRequest(
        parent="collections/gallery", image=image, context=context, request_id=request_id
    )
    first = api.SearchFacesByImage(request)
    again = api.SearchFacesByImage(request)
    assert again.audit_record == first.audit_record
    assert [m.face.name for m in again.face_matches] == [m.face.name for m in first.face_matches]
    other = api.SearchFacesByImage(
        F.SearchFacesByImageRequest(
            parent="collections/gallery",
            image=photo(faces, "knn/test/alex_lacamoire1.jpg"),
            context=context,
            request_id=request_id,
        )
    )
    assert other.audit_record != first.audit_record
    records = api.ListAuditRecords(
        F.ListAuditRecordsRequest(filter=F.AuditRecordFilter(case_id=case))
    ).audit_records
    assert [r.name for r in records] == [first.audit_record, other.audit_record]
    assert {r.request_id for r in records} == {request_id}
    bad = rpc_error(
        lambda: api.SearchFacesByImage(
            F.SearchFacesByImageRequest(
                parent="collections/gallery", image=image, context=context, request_id="nope"
            )
        )
    )
    assert bad.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field_violations(bad) == {"request_id": "must be a UUID"}


def test_an_examiners_decision_is_recorded_with_the_search_and_changes_no_face(
    api: Client, faces: Path, gallery: dict[str, list[str]]
) -> None:
    """Review: a decision on a real search's top candidate is an audit record naming
    the search; its retry (same request_id) is that record again; the face is as it was."""
    case = f"CASE-{uuid.uuid4().hex[:8]}"
    context = common_pb2.IdentificationContext(
        purpose=Purpose.PURPOSE_CRIMINAL_INVESTIGATION, case_id=case, justification="review"
    )
    reply = api.SearchFacesByImage(
        F.SearchFacesByImageRequest(
            parent="collections/gallery",
            image=photo(faces, "knn/test/obama1.jpg"),
            context=context,
        )
    )
    candidate = reply.face_matches[0].face.name
    before = api.GetFace(F.GetFaceRequest(name=candidate)).face
    request = F.CreateReviewDecisionRequest(
        review_decision=F.ReviewDecision(
            reviewed_record=reply.audit_record,
            candidate=candidate,
            outcome=Outcome.OUTCOME_POSSIBLE_MATCH,
            reason="same ear shape; for the investigating officer",
        ),
        request_id=str(uuid.uuid4()),
    )
    decided = api.CreateReviewDecision(request)
    assert api.CreateReviewDecision(request).audit_record == decided.audit_record
    listed = api.ListReviewDecisions(
        F.ListReviewDecisionsRequest(reviewed_record=reply.audit_record)
    ).audit_records
    assert [r.name for r in listed] == [decided.audit_record]
    (record,) = listed
    assert record.target == reply.audit_record
    assert record.context.case_id == case
    assert record.review_decision.candidate == candidate
    assert record.review_decision.outcome == Outcome.OUTCOME_POSSIBLE_MATCH
    assert api.GetFace(F.GetFaceRequest(name=candidate)).face == before
    other = (
        reply.face_matches[-1].face.name if len(reply.face_matches) > 1 else "collections/x/faces/y"
    )
    error = rpc_error(
        lambda: api.CreateReviewDecision(
            F.CreateReviewDecisionRequest(
                review_decision=F.ReviewDecision(
                    reviewed_record=decided.audit_record,  # a decision is not a search
                    candidate=other,
                    outcome=Outcome.OUTCOME_NOT_A_MATCH,
                    reason="no",
                )
            )
        )
    )
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_audit_records_every_accountable_call(
    api: Client, channel: grpc.Channel, e2e_stack: Stack, faces: Path, gallery: dict[str, list[str]]
) -> None:
    image = photo(faces, "knn/test/obama1.jpg")
    case = f"CASE-{uuid.uuid4().hex[:8]}"
    context = common_pb2.IdentificationContext(
        purpose=Purpose.PURPOSE_CRIMINAL_INVESTIGATION, case_id=case, justification="robbery"
    )
    reply = api.SearchFacesByImage(
        F.SearchFacesByImageRequest(parent="collections/gallery", image=image, context=context)
    )
    record = api.GetAuditRecord(F.GetAuditRecordRequest(name=reply.audit_record)).audit_record
    assert record.principal == "investigator-1"
    assert record.method == "/facegrid.v1.FaceService/SearchFacesByImage"
    assert record.context.case_id == case
    assert record.context.justification == "robbery"
    assert record.collection == "collections/gallery"
    assert record.threshold == reply.threshold
    assert list(record.result_resources) == [m.face.name for m in reply.face_matches]
    assert record.top_similarity == pytest.approx(reply.face_matches[0].similarity)
    assert record.model_version == reply.model_version
    assert record.status_code == 0
    assert len(record.image_digests) == 1
    assert len(record.image_digests[0]) == 32
    assert image not in record.SerializeToString()
    # A refused call is on the record too, with its status.
    bad = common_pb2.IdentificationContext(
        purpose=Purpose.PURPOSE_CRIMINAL_INVESTIGATION, case_id=case
    )
    rpc_error(
        lambda: api.SearchFacesByImage(
            F.SearchFacesByImageRequest(parent="collections/nowhere", image=image, context=bad)
        )
    )
    by_case = api.ListAuditRecords(
        F.ListAuditRecordsRequest(filter=F.AuditRecordFilter(case_id=case))
    ).audit_records
    assert [r.status_code for r in by_case] == [0, grpc.StatusCode.NOT_FOUND.value[0]]
    # A caller without the scope is refused, and that is recorded under its name.
    reader = Client(channel, e2e_stack, e2e_stack.tokens["facegrid.read"])
    rpc_error(
        lambda: reader.SearchFacesByImage(
            F.SearchFacesByImageRequest(parent="collections/gallery", image=image, context=bad)
        )
    )
    # The whole log, page by page, is one unbroken hash chain.
    records = []
    token = ""
    while True:
        page = api.ListAuditRecords(F.ListAuditRecordsRequest(page_size=7, page_token=token))
        records += list(page.audit_records)
        token = page.next_page_token
        if not token:
            break
    assert [r.sequence_number for r in records] == list(range(1, len(records) + 1))
    assert verify_chain(records).intact
    denied = [r for r in records if r.principal == "only-facegrid.read"]
    assert denied
    assert denied[-1].status_code == grpc.StatusCode.PERMISSION_DENIED.value[0]
    methods = {r.method.rsplit("/", 1)[1] for r in records}
    assert {"CreateCollection", "IndexFaces", "CreateSubject", "SearchFacesByImage"} <= methods
    assert "GetCollection" not in methods
    assert "DetectFaces" not in methods
