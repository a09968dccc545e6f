"""SearchService contract tests, run on Milvus Lite and on a real Milvus server.

Every test talks to the service over gRPC; the service is a separate process, storing
in Milvus Lite (a file, with the in-memory exact cache) or in a Milvus 2.3 standalone
server started by the test session on 127.0.0.1 (no cache: Milvus searches itself).
"""

from __future__ import annotations

import copy
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from conftest import ServiceProcess, start_service
from facegrid.internal.v1 import search_pb2, search_pb2_grpc
from facegrid.v1 import common_pb2, resources_pb2
from google.protobuf import field_mask_pb2, timestamp_pb2
from grpc_helpers import DEADLINE_S, error_reason, field_violations, is_serving, rpc_error
from numpy.typing import NDArray

S = search_pb2
DIM = 128
MODEL = "test-model-v1"


def calibration() -> common_pb2.SimilarityCalibration:
    points = [
        common_pb2.SimilarityCalibration.Point(cosine_similarity=0.0, similarity=0.0),
        common_pb2.SimilarityCalibration.Point(cosine_similarity=1.0, similarity=100.0),
    ]
    return common_pb2.SimilarityCalibration(model_version=MODEL, points=points)


def unit(rows: int, seed: int) -> NDArray[np.float32]:
    data = np.random.default_rng(seed).normal(size=(rows, DIM)).astype(np.float32)
    return data / np.linalg.norm(data, axis=1, keepdims=True)


def embedding(vector: NDArray[np.float32]) -> common_pb2.Embedding:
    return common_pb2.Embedding(values=[float(v) for v in vector])


@pytest.fixture(scope="module")
def search(search_service: ServiceProcess) -> Iterator[search_pb2_grpc.SearchServiceStub]:
    with grpc.insecure_channel(search_service.address) as channel:
        yield search_pb2_grpc.SearchServiceStub(channel)


class Gallery:
    """A collection with faces, made through the service."""

    def __init__(self, stub: search_pb2_grpc.SearchServiceStub, size: int, seed: int) -> None:
        self.stub = stub
        self.id = f"c{uuid.uuid4().hex[:12]}"
        self.name = f"collections/{self.id}"
        stub.CreateCollection(
            S.CreateCollectionRequest(
                collection_id=self.id,
                collection=resources_pb2.Collection(
                    dimension=DIM, model_version=MODEL, similarity_calibration=calibration()
                ),
            ),
            timeout=DEADLINE_S,
        )
        self.vectors = unit(size, seed)
        self.face_ids = [str(uuid.UUID(int=seed * 10**6 + i)) for i in range(size)]
        self.sources = [f"cam-{i % 3}" for i in range(size)]
        self.times = [1_700_000_000 + i for i in range(size)]
        self.upsert(range(size))

    def face(self, i: int) -> str:
        return f"{self.name}/faces/{self.face_ids[i]}"

    def through(self, stub: search_pb2_grpc.SearchServiceStub) -> Gallery:
        """The same collection, called through another replica."""
        other = copy.copy(self)
        other.stub = stub
        return other

    def upsert(self, indices: range | list[int], subject: str = "") -> None:
        faces = []
        for i in indices:
            face = resources_pb2.Face(
                name=self.face(i),
                subject_id=subject,
                source_id=self.sources[i],
                external_image_id=f"img-{i}",
                model_version=MODEL,
                embedding=embedding(self.vectors[i]),
            )
            face.create_time.FromSeconds(self.times[i])
            face.metadata.update({"index": i})
            faces.append(face)
        self.stub.BatchUpsertFaces(
            S.BatchUpsertFacesRequest(parent=self.name, faces=faces),
            timeout=DEADLINE_S,
        )

    def search(self, query: NDArray[np.float32], **fields: object) -> list[resources_pb2.FaceMatch]:
        reply = self.stub.SearchFaces(
            S.SearchFacesRequest(
                parent=self.name,
                queries=[embedding(query)],
                model_version=MODEL,
                **fields,  # type: ignore[arg-type]
            ),
            timeout=DEADLINE_S,
        )
        return list(reply.results[0].matches)

    def expected(self, query: NDArray[np.float32], k: int, allowed: list[int]) -> list[str]:
        scores = self.vectors[allowed] @ query
        order = np.argsort(-scores, kind="stable")[:k]
        return [self.face_ids[allowed[i]] for i in order]

    def delete(self) -> None:
        self.stub.DeleteCollection(
            S.DeleteCollectionRequest(name=self.name, force=True), timeout=DEADLINE_S
        )


@pytest.fixture(scope="module")
def gallery(search: search_pb2_grpc.SearchServiceStub) -> Iterator[Gallery]:
    made = Gallery(search, 300, seed=1)
    yield made
    made.delete()


# ---------------------------------------------------------------- collections


def test_collection_lifecycle(search: search_pb2_grpc.SearchServiceStub) -> None:
    made = Gallery(search, 5, seed=2)
    got = search.GetCollection(S.GetCollectionRequest(name=made.name), timeout=DEADLINE_S)
    collection = got.collection
    assert collection.name == made.name
    assert (collection.dimension, collection.model_version) == (DIM, MODEL)
    assert collection.face_count == 5
    assert collection.metric == resources_pb2.METRIC_COSINE
    assert collection.create_time.seconds > 0
    listed = search.ListCollections(S.ListCollectionsRequest(), timeout=DEADLINE_S)
    assert made.name in [c.name for c in listed.collections]

    error = rpc_error(
        lambda: search.DeleteCollection(
            S.DeleteCollectionRequest(name=made.name), timeout=DEADLINE_S
        )
    )
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION  # not empty, no force
    made.delete()
    error = rpc_error(
        lambda: search.GetCollection(S.GetCollectionRequest(name=made.name), timeout=DEADLINE_S)
    )
    assert error.code() == grpc.StatusCode.NOT_FOUND


def test_a_collection_reports_its_index_and_refuses_what_is_not_implemented(
    search: search_pb2_grpc.SearchServiceStub, store_kind: str
) -> None:
    made = Gallery(search, 1, seed=3)
    index = search.GetCollection(
        S.GetCollectionRequest(name=made.name), timeout=DEADLINE_S
    ).collection.index_config
    if store_kind == "server":  # no cache: Milvus answers, through its HNSW index
        assert index == resources_pb2.IndexConfig(
            type=resources_pb2.IndexConfig.TYPE_HNSW,
            hnsw_m=16,
            hnsw_ef_construction=200,
            hnsw_ef_search=64,
        )
    else:  # the exact in-memory index answers; Milvus Lite keeps a FLAT one
        assert index == resources_pb2.IndexConfig(type=resources_pb2.IndexConfig.TYPE_FLAT)
    made.delete()

    refused = [
        (resources_pb2.Collection(metric=resources_pb2.METRIC_EUCLIDEAN), "collection.metric"),
        (resources_pb2.Collection(metric=resources_pb2.METRIC_INNER_PRODUCT), "collection.metric"),
        (
            resources_pb2.Collection(
                index_config=resources_pb2.IndexConfig(type=resources_pb2.IndexConfig.TYPE_FLAT)
            ),
            "collection.index_config",
        ),
    ]
    for given, field in refused:
        given.MergeFrom(
            resources_pb2.Collection(
                dimension=DIM, model_version=MODEL, similarity_calibration=calibration()
            )
        )
        collection_id = f"c{uuid.uuid4().hex[:12]}"
        error = rpc_error(
            lambda: search.CreateCollection(
                S.CreateCollectionRequest(
                    collection_id=collection_id,  # noqa: B023 (called at once)
                    collection=given,  # noqa: B023
                ),
                timeout=DEADLINE_S,
            )
        )
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert field in field_violations(error), error.details()
        missing = rpc_error(
            lambda: search.GetCollection(
                S.GetCollectionRequest(
                    name=f"collections/{collection_id}"  # noqa: B023
                ),
                timeout=DEADLINE_S,
            )
        )
        assert missing.code() == grpc.StatusCode.NOT_FOUND


def test_update_collection_changes_only_the_masked_fields(
    search: search_pb2_grpc.SearchServiceStub,
) -> None:
    made = Gallery(search, 3, seed=21)

    def update(collection: resources_pb2.Collection, *paths: str) -> resources_pb2.Collection:
        reply = search.UpdateCollection(
            S.UpdateCollectionRequest(
                collection=collection, update_mask=field_mask_pb2.FieldMask(paths=list(paths))
            ),
            timeout=DEADLINE_S,
        )
        return reply.collection

    changed = update(
        resources_pb2.Collection(
            name=made.name, display_name="Booking photos", min_match_threshold=85.0
        ),
        "display_name",
        "min_match_threshold",
    )
    assert changed.display_name == "Booking photos"
    assert changed.min_match_threshold == pytest.approx(85.0)
    assert changed.face_count == 3  # the faces are not touched
    assert changed.similarity_calibration == calibration()
    # Not in the mask: left as it is, although the request carries a value.
    kept = update(
        resources_pb2.Collection(name=made.name, description="d", display_name="ignored"),
        "description",
    )
    assert (kept.display_name, kept.description) == ("Booking photos", "d")
    assert kept.HasField("min_match_threshold")
    cleared = update(resources_pb2.Collection(name=made.name), "min_match_threshold")
    assert not cleared.HasField("min_match_threshold")
    got = search.GetCollection(
        S.GetCollectionRequest(name=made.name), timeout=DEADLINE_S
    ).collection
    assert (got.display_name, got.description) == ("Booking photos", "d")
    assert not got.HasField("min_match_threshold")
    for paths, collection, field in (
        ((), resources_pb2.Collection(name=made.name), "update_mask"),
        (("face_count",), resources_pb2.Collection(name=made.name), "update_mask"),
        (
            ("min_match_threshold",),
            resources_pb2.Collection(name=made.name, min_match_threshold=101.0),
            "collection.min_match_threshold",
        ),
    ):
        error = rpc_error(lambda c=collection, p=paths: update(c, *p))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert field in field_violations(error)
    error = rpc_error(
        lambda: update(resources_pb2.Collection(name="collections/missing-one"), "description")
    )
    assert error.code() == grpc.StatusCode.NOT_FOUND
    made.delete()


def test_duplicate_collection_is_already_exists(
    search: search_pb2_grpc.SearchServiceStub, gallery: Gallery
) -> None:
    error = rpc_error(
        lambda: search.CreateCollection(
            S.CreateCollectionRequest(
                collection_id=gallery.id,
                collection=resources_pb2.Collection(
                    dimension=DIM, model_version=MODEL, similarity_calibration=calibration()
                ),
            ),
            timeout=DEADLINE_S,
        )
    )
    assert error.code() == grpc.StatusCode.ALREADY_EXISTS
    assert (
        search.GetCollection(
            S.GetCollectionRequest(name=gallery.name), timeout=DEADLINE_S
        ).collection.face_count
        == 300
    )


@pytest.mark.parametrize(
    ("collection_id", "collection", "field"),
    [
        ("Bad_Id", resources_pb2.Collection(dimension=DIM, model_version=MODEL), "collection_id"),
        (
            "ok-id",
            resources_pb2.Collection(dimension=0, model_version=MODEL),
            "collection.dimension",
        ),
        ("ok-id", resources_pb2.Collection(dimension=DIM), "collection.model_version"),
    ],
)
def test_invalid_collections(
    search: search_pb2_grpc.SearchServiceStub,
    collection_id: str,
    collection: resources_pb2.Collection,
    field: str,
) -> None:
    collection.similarity_calibration.CopyFrom(calibration())
    error = rpc_error(
        lambda: search.CreateCollection(
            S.CreateCollectionRequest(collection_id=collection_id, collection=collection),
            timeout=DEADLINE_S,
        )
    )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in field_violations(error)


def test_missing_calibration_is_invalid(search: search_pb2_grpc.SearchServiceStub) -> None:
    error = rpc_error(
        lambda: search.CreateCollection(
            S.CreateCollectionRequest(
                collection_id="no-calibration",
                collection=resources_pb2.Collection(dimension=DIM, model_version=MODEL),
            ),
            timeout=DEADLINE_S,
        )
    )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT


# ---------------------------------------------------------------- faces


def test_get_face_basic_and_full(
    search: search_pb2_grpc.SearchServiceStub, gallery: Gallery
) -> None:
    basic = search.GetFace(S.GetFaceRequest(name=gallery.face(7)), timeout=DEADLINE_S)
    face = basic.face
    assert (face.face_id, face.source_id, face.external_image_id) == (
        gallery.face_ids[7],
        gallery.sources[7],
        "img-7",
    )
    assert face.create_time.seconds == gallery.times[7]
    assert face.metadata["index"] == 7
    assert face.model_version == MODEL
    assert not face.embedding.values
    full = search.GetFace(
        S.GetFaceRequest(name=gallery.face(7), view=S.FACE_VIEW_FULL),
        timeout=DEADLINE_S,
    )
    assert np.allclose(full.face.embedding.values, gallery.vectors[7], atol=1e-6)


def test_list_faces_pages_through_everything_once(
    search: search_pb2_grpc.SearchServiceStub, gallery: Gallery
) -> None:
    seen: list[str] = []
    token = ""
    while True:
        page = search.ListFaces(
            S.ListFacesRequest(parent=gallery.name, page_size=70, page_token=token),
            timeout=DEADLINE_S,
        )
        assert len(page.faces) <= 70
        seen += [f.face_id for f in page.faces]
        token = page.next_page_token
        if not token:
            break
    assert sorted(seen) == sorted(gallery.face_ids)
    assert len(seen) == len(set(seen))


def test_list_faces_with_filters(
    search: search_pb2_grpc.SearchServiceStub, gallery: Gallery
) -> None:
    window = common_pb2.TimeRange(
        start_time=timestamp_pb2.Timestamp(seconds=gallery.times[10]),
        end_time=timestamp_pb2.Timestamp(seconds=gallery.times[40]),
    )
    request = S.ListFacesRequest(
        parent=gallery.name,
        page_size=1000,
        filter=resources_pb2.FaceFilter(source_ids=["cam-1"], create_time_range=window),
    )
    got = {f.face_id for f in search.ListFaces(request, timeout=DEADLINE_S).faces}
    expected = {gallery.face_ids[i] for i in range(10, 40) if gallery.sources[i] == "cam-1"}
    assert got == expected


def test_page_token_of_another_request_is_refused(
    search: search_pb2_grpc.SearchServiceStub, gallery: Gallery
) -> None:
    first = search.ListFaces(
        S.ListFacesRequest(parent=gallery.name, page_size=5), timeout=DEADLINE_S
    )
    other = S.ListFacesRequest(
        parent=gallery.name,
        page_size=5,
        page_token=first.next_page_token,
        filter=resources_pb2.FaceFilter(source_ids=["cam-2"]),
    )
    error = rpc_error(lambda: search.ListFaces(other, timeout=DEADLINE_S))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "page_token" in field_violations(error)
    error = rpc_error(
        lambda: search.ListFaces(
            S.ListFacesRequest(parent=gallery.name, page_size=-1), timeout=DEADLINE_S
        )
    )
    assert "page_size" in field_violations(error)


# ---------------------------------------------------------------- search


def test_search_is_exact_and_ordered(
    search: search_pb2_grpc.SearchServiceStub, gallery: Gallery
) -> None:
    queries = unit(5, seed=99)
    everyone = list(range(len(gallery.face_ids)))
    for query in queries:
        matches = gallery.search(query, top_k=10)
        assert [m.face.face_id for m in matches] == gallery.expected(query, 10, everyone)
        sims = [m.similarity for m in matches]
        assert sims == sorted(sims, reverse=True)
        for match in matches:
            cosine = float(gallery.vectors[gallery.face_ids.index(match.face.face_id)] @ query)
            assert match.cosine_similarity == pytest.approx(cosine, abs=1e-5)
            assert match.similarity == pytest.approx(max(0.0, 100 * cosine), abs=1e-3)
            assert match.distance == pytest.approx(np.sqrt(2 - 2 * cosine), abs=1e-4)
            assert match.model_version == MODEL


def test_search_own_vector_first(
    search: search_pb2_grpc.SearchServiceStub, gallery: Gallery
) -> None:
    matches = gallery.search(gallery.vectors[42], top_k=3)
    assert matches[0].face.face_id == gallery.face_ids[42]
    assert matches[0].similarity == pytest.approx(100.0, abs=1e-3)


def test_search_with_filters_is_exact(
    search: search_pb2_grpc.SearchServiceStub, gallery: Gallery
) -> None:
    query = unit(1, seed=5)[0]
    allowed = [i for i in range(len(gallery.face_ids)) if gallery.sources[i] == "cam-2"]
    matches = gallery.search(query, top_k=20, filter=resources_pb2.FaceFilter(source_ids=["cam-2"]))
    assert [m.face.face_id for m in matches] == gallery.expected(query, 20, allowed)
    window = common_pb2.TimeRange(
        start_time=timestamp_pb2.Timestamp(seconds=gallery.times[100]),
        end_time=timestamp_pb2.Timestamp(seconds=gallery.times[110]),
    )
    matches = gallery.search(
        query, top_k=50, filter=resources_pb2.FaceFilter(create_time_range=window)
    )
    assert [m.face.face_id for m in matches] == gallery.expected(query, 50, list(range(100, 110)))


def test_min_similarity_cuts_and_is_reported(
    search: search_pb2_grpc.SearchServiceStub, gallery: Gallery
) -> None:
    query = gallery.vectors[3]
    matches = gallery.search(query, top_k=50, min_similarity=20.0)
    assert matches
    assert all(m.similarity >= 20.0 for m in matches)
    assert all(m.threshold_applied == pytest.approx(20.0) for m in matches)


@pytest.mark.parametrize(
    ("face_filter", "field"),
    [
        (resources_pb2.FaceFilter(source_ids=['cam" or 1==1']), "filter.source_ids[0]"),
        (resources_pb2.FaceFilter(subject_ids=[""]), "filter.subject_ids[0]"),
        (resources_pb2.FaceFilter(image_ids=["not-a-uuid"]), "filter.image_ids[0]"),
    ],
)
def test_invalid_filters(
    search: search_pb2_grpc.SearchServiceStub,
    gallery: Gallery,
    face_filter: resources_pb2.FaceFilter,
    field: str,
) -> None:
    error = rpc_error(
        lambda: search.SearchFaces(
            S.SearchFacesRequest(
                parent=gallery.name,
                queries=[embedding(gallery.vectors[0])],
                model_version=MODEL,
                filter=face_filter,
            ),
            timeout=DEADLINE_S,
        )
    )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in field_violations(error)


def test_model_version_mismatch(
    search: search_pb2_grpc.SearchServiceStub, gallery: Gallery
) -> None:
    error = rpc_error(
        lambda: search.SearchFaces(
            S.SearchFacesRequest(
                parent=gallery.name, queries=[embedding(gallery.vectors[0])], model_version="other"
            ),
            timeout=DEADLINE_S,
        )
    )
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION


@pytest.mark.parametrize(
    ("values", "why"),
    [
        ([0.1] * 64, "dimension"),
        ([float("nan")] + [0.0] * (DIM - 1), "nan"),
        ([0.0] * DIM, "zero"),
        ([1.0] * DIM, "not unit"),
    ],
)
def test_bad_query_vectors(
    search: search_pb2_grpc.SearchServiceStub, gallery: Gallery, values: list[float], why: str
) -> None:
    error = rpc_error(
        lambda: search.SearchFaces(
            S.SearchFacesRequest(
                parent=gallery.name,
                queries=[common_pb2.Embedding(values=values)],
                model_version=MODEL,
            ),
            timeout=DEADLINE_S,
        )
    )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, why
    assert error_reason(error) == "INVALID_EMBEDDING"


def test_bad_upserts_harm_nothing(
    search: search_pb2_grpc.SearchServiceStub, gallery: Gallery
) -> None:
    good = resources_pb2.Face(
        name=f"{gallery.name}/faces/{uuid.uuid4()}",
        model_version=MODEL,
        embedding=embedding(unit(1, seed=3)[0]),
    )
    bad = resources_pb2.Face(
        name=f"{gallery.name}/faces/{uuid.uuid4()}",
        model_version=MODEL,
        embedding=common_pb2.Embedding(values=[0.5] * 10),
    )
    error = rpc_error(
        lambda: search.BatchUpsertFaces(
            S.BatchUpsertFacesRequest(parent=gallery.name, faces=[good, bad]),
            timeout=DEADLINE_S,
        )
    )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "faces[1].values" in field_violations(error)
    missing = rpc_error(
        lambda: search.GetFace(S.GetFaceRequest(name=good.name), timeout=DEADLINE_S)
    )
    assert missing.code() == grpc.StatusCode.NOT_FOUND  # all or nothing
    unknown = rpc_error(
        lambda: search.BatchUpsertFaces(
            S.BatchUpsertFacesRequest(
                parent="collections/does-not-exist",
                faces=[good],
            ),
            timeout=DEADLINE_S,
        )
    )
    assert unknown.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT)
    count = search.GetCollection(
        S.GetCollectionRequest(name=gallery.name), timeout=DEADLINE_S
    ).collection.face_count
    assert count == 300


# ---------------------------------------------------------------- deletes and subjects


def test_deleted_faces_never_come_back(search: search_pb2_grpc.SearchServiceStub) -> None:
    made = Gallery(search, 40, seed=7)
    try:
        doomed = [made.face(i) for i in (0, 1, 2)]
        reply = search.BatchDeleteFaces(
            S.BatchDeleteFacesRequest(parent=made.name, names=doomed),
            timeout=DEADLINE_S,
        )
        assert list(reply.deleted_faces) == doomed
        for i in (0, 1, 2):
            matches = made.search(made.vectors[i], top_k=40)
            assert made.face_ids[i] not in {m.face.face_id for m in matches}
            error = rpc_error(
                lambda i=i: search.GetFace(S.GetFaceRequest(name=made.face(i)), timeout=DEADLINE_S)
            )
            assert error.code() == grpc.StatusCode.NOT_FOUND
        listed = search.ListFaces(
            S.ListFacesRequest(parent=made.name, page_size=1000), timeout=DEADLINE_S
        )
        assert len(listed.faces) == 37
        error = rpc_error(
            lambda: search.BatchDeleteFaces(
                S.BatchDeleteFacesRequest(parent=made.name, names=[doomed[0]]),
                timeout=DEADLINE_S,
            )
        )
        assert error.code() == grpc.StatusCode.NOT_FOUND
        again = search.BatchDeleteFaces(
            S.BatchDeleteFacesRequest(
                parent=made.name, names=[doomed[0], made.face(3)], allow_missing=True
            ),
            timeout=DEADLINE_S,
        )
        assert list(again.deleted_faces) == [made.face(3)]
    finally:
        made.delete()


def test_purge_by_filter_counts_then_deletes(search: search_pb2_grpc.SearchServiceStub) -> None:
    made = Gallery(search, 30, seed=8)
    try:
        purge = S.PurgeFacesRequest(
            parent=made.name, filter=resources_pb2.FaceFilter(source_ids=["cam-0"])
        )
        dry = search.PurgeFaces(purge, timeout=DEADLINE_S)
        assert dry.purge_count == 10
        purge.force = True
        assert search.PurgeFaces(purge, timeout=DEADLINE_S).purge_count == 10
        left = made.search(made.vectors[0], top_k=30)
        assert all(m.face.source_id != "cam-0" for m in left)
        assert len(left) == 20
        empty = rpc_error(
            lambda: search.PurgeFaces(
                S.PurgeFacesRequest(parent=made.name, force=True), timeout=DEADLINE_S
            )
        )
        assert empty.code() == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        made.delete()


def test_subjects(search: search_pb2_grpc.SearchServiceStub) -> None:
    made = Gallery(search, 20, seed=9)
    try:
        subject = f"{made.name}/subjects/person-1"
        search.CreateSubject(
            S.CreateSubjectRequest(
                parent=made.name,
                subject_id="person-1",
                subject=resources_pb2.Subject(display_name="Person One"),
            ),
            timeout=DEADLINE_S,
        )
        search.CreateSubject(
            S.CreateSubjectRequest(parent=made.name, subject_id="person-2"),
            timeout=DEADLINE_S,
        )
        duplicate = rpc_error(
            lambda: search.CreateSubject(
                S.CreateSubjectRequest(parent=made.name, subject_id="person-1"),
                timeout=DEADLINE_S,
            )
        )
        assert duplicate.code() == grpc.StatusCode.ALREADY_EXISTS
        reply = search.AssociateFaces(
            S.AssociateFacesRequest(
                subject=subject, faces=[made.face(0), made.face(1), made.face(2)]
            ),
            timeout=DEADLINE_S,
        )
        assert reply.subject.face_count == 3
        assert reply.subject.display_name == "Person One"
        taken = rpc_error(
            lambda: search.AssociateFaces(
                S.AssociateFacesRequest(
                    subject=f"{made.name}/subjects/person-2", faces=[made.face(0)]
                ),
                timeout=DEADLINE_S,
            )
        )
        assert taken.code() == grpc.StatusCode.FAILED_PRECONDITION
        search.AssociateFaces(
            S.AssociateFacesRequest(subject=f"{made.name}/subjects/person-2", faces=[made.face(5)]),
            timeout=DEADLINE_S,
        )
        # Grouped search: each subject once, through its best face.
        grouped = made.search(made.vectors[1], top_k=10, group_by_subject=True)
        assert [m.face.subject_id for m in grouped][:1] == ["person-1"]
        assert grouped[0].face.face_id == made.face_ids[1]
        assert sorted(m.face.subject_id for m in grouped) == ["person-1", "person-2"]
        by_subject = made.search(
            made.vectors[0], top_k=20, filter=resources_pb2.FaceFilter(subject_ids=["person-1"])
        )
        assert {m.face.face_id for m in by_subject} == set(made.face_ids[:3])

        search.DisassociateFaces(
            S.DisassociateFacesRequest(subject=subject, faces=[made.face(2)]),
            timeout=DEADLINE_S,
        )
        listed = search.ListSubjects(S.ListSubjectsRequest(parent=made.name), timeout=DEADLINE_S)
        counts = {s.subject_id: s.face_count for s in listed.subjects}
        assert counts == {"person-1": 2, "person-2": 1}

        refused = rpc_error(
            lambda: search.DeleteSubject(S.DeleteSubjectRequest(name=subject), timeout=DEADLINE_S)
        )
        assert refused.code() == grpc.StatusCode.FAILED_PRECONDITION
        deleted = search.DeleteSubject(
            S.DeleteSubjectRequest(name=subject, force=True), timeout=DEADLINE_S
        )
        assert deleted.deleted_face_count == 2
        matches = made.search(made.vectors[0], top_k=20)
        assert not {made.face_ids[0], made.face_ids[1]} & {m.face.face_id for m in matches}
        gone = rpc_error(
            lambda: search.GetSubject(S.GetSubjectRequest(name=subject), timeout=DEADLINE_S)
        )
        assert gone.code() == grpc.StatusCode.NOT_FOUND
    finally:
        made.delete()


def test_service_still_serving(search_service: ServiceProcess) -> None:
    with grpc.insecure_channel(search_service.address) as channel:
        assert is_serving(channel, "facegrid.internal.v1.SearchService")


# ---------------------------------------------------------------- restarts


def test_deletes_and_upserts_survive_a_restart(store_uri: str, tmp_path: Path) -> None:
    service = start_service("search", [f"store.uri={store_uri}"], tmp_path)
    try:
        with grpc.insecure_channel(service.address) as channel:
            made = Gallery(search_pb2_grpc.SearchServiceStub(channel), 10, seed=11)
            made.stub.BatchDeleteFaces(
                S.BatchDeleteFacesRequest(parent=made.name, names=[made.face(4)]),
                timeout=DEADLINE_S,
            )
    finally:
        assert service.stop() == 0
    lite = not store_uri.startswith("http")
    # On Milvus Lite a clean stop leaves a snapshot of the index, read at the next start.
    assert Path(f"{store_uri}.index").is_dir() == lite
    service = start_service("search", [f"store.uri={store_uri}"], tmp_path)
    try:
        if lite:
            assert f"restored 9 faces of {made.id} from the snapshot" in service.log()
        with grpc.insecure_channel(service.address) as channel:
            made.stub = search_pb2_grpc.SearchServiceStub(channel)
            matches = made.search(made.vectors[4], top_k=10)
            assert len(matches) == 9
            assert made.face_ids[4] not in {m.face.face_id for m in matches}
            assert matches[0].similarity < 99.0
            made.delete()
    finally:
        service.stop()


def test_acknowledged_upserts_survive_sigkill(store_uri: str, tmp_path: Path) -> None:
    """SIGKILL the service in the middle of a stream of upserts; after a restart, every
    upsert that was acknowledged is there and searchable."""
    import signal
    import threading
    import time

    service = start_service("search", [f"store.uri={store_uri}"], tmp_path)
    acknowledged: list[int] = []
    batch = 20
    vectors = unit(batch * 400, seed=12)
    face_ids = [str(uuid.uuid4()) for _ in range(len(vectors))]
    with grpc.insecure_channel(service.address) as channel:
        made = Gallery(search_pb2_grpc.SearchServiceStub(channel), 1, seed=13)

        def stream() -> None:
            for start in range(0, len(vectors), batch):
                faces = [
                    resources_pb2.Face(
                        name=f"{made.name}/faces/{face_ids[i]}",
                        model_version=MODEL,
                        embedding=embedding(vectors[i]),
                    )
                    for i in range(start, start + batch)
                ]
                try:
                    made.stub.BatchUpsertFaces(
                        S.BatchUpsertFacesRequest(parent=made.name, faces=faces),
                        timeout=DEADLINE_S,
                    )
                except grpc.RpcError:
                    return
                acknowledged.extend(range(start, start + batch))

        writer = threading.Thread(target=stream)
        writer.start()
        deadline = time.monotonic() + 60
        while len(acknowledged) < 10 * batch and time.monotonic() < deadline:
            time.sleep(0.01)
        service.process.send_signal(signal.SIGKILL)
        writer.join(timeout=60)
    service.process.wait()
    assert 10 * batch <= len(acknowledged) < len(vectors), "kill landed mid-stream"

    service = start_service("search", [f"store.uri={store_uri}"], tmp_path)
    try:
        with grpc.insecure_channel(service.address) as channel:
            made.stub = search_pb2_grpc.SearchServiceStub(channel)
            stored: set[str] = set()
            token = ""
            while True:
                page = made.stub.ListFaces(
                    S.ListFacesRequest(parent=made.name, page_size=1000, page_token=token),
                    timeout=DEADLINE_S,
                )
                stored |= {f.face_id for f in page.faces}
                token = page.next_page_token
                if not token:
                    break
            missing = [i for i in acknowledged if face_ids[i] not in stored]
            assert not missing, f"{len(missing)} acknowledged upserts lost"
            for i in acknowledged[:: max(1, len(acknowledged) // 20)]:
                top = made.search(vectors[i], top_k=1)
                assert top[0].face.face_id == face_ids[i]
            made.delete()
    finally:
        service.stop()
