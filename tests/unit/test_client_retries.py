"""The client's retries are gRPC's retry policy, derived from the contract's method
options: against a real gRPC server in this process that answers UNAVAILABLE twice
before serving, an idempotent call succeeds on its third attempt, a call that is not
idempotent fails on its first, and IndexFaces and identification calls carry one
request_id through every attempt."""

from __future__ import annotations

import uuid
from collections import Counter
from collections.abc import Iterator
from concurrent import futures
from typing import Any

import grpc
import pytest
from facegrid.v1 import face_service_pb2 as fs
from facegrid.v1 import face_service_pb2_grpc
from facegrid_client.connection import FaceClient

FAILURES_BEFORE_SERVING = 2  # the policy makes three attempts


class FlakyFaceService(face_service_pb2_grpc.FaceServiceServicer):
    """Answers UNAVAILABLE to the first two attempts of every method, then serves."""

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()
        self.request_ids: dict[str, list[str]] = {}

    def _attempt(self, method: str, request: Any, context: grpc.ServicerContext) -> None:
        self.calls[method] += 1
        if hasattr(request, "request_id"):
            self.request_ids.setdefault(method, []).append(request.request_id)
        if self.calls[method] <= FAILURES_BEFORE_SERVING:
            context.abort(grpc.StatusCode.UNAVAILABLE, "restarting")

    def ListCollections(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        self._attempt("ListCollections", request, context)
        return fs.ListCollectionsResponse()

    def CreateCollection(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        self._attempt("CreateCollection", request, context)
        return fs.CreateCollectionResponse()

    def BatchDeleteFaces(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        self._attempt("BatchDeleteFaces", request, context)
        return fs.BatchDeleteFacesResponse()

    def IndexFaces(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        self._attempt("IndexFaces", request, context)
        return fs.IndexFacesResponse()

    def SearchFaces(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        self._attempt("SearchFaces", request, context)
        return fs.SearchFacesResponse()


@pytest.fixture
def flaky() -> Iterator[tuple[FlakyFaceService, FaceClient]]:
    service = FlakyFaceService()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    face_service_pb2_grpc.add_FaceServiceServicer_to_server(service, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with FaceClient.connect(f"127.0.0.1:{port}", "token", deadline_s=30) as client:
            yield service, client
    finally:
        server.stop(0)


def test_an_idempotent_call_is_retried_until_served(
    flaky: tuple[FlakyFaceService, FaceClient],
) -> None:
    service, client = flaky
    client.list_collections(fs.ListCollectionsRequest())
    assert service.calls["ListCollections"] == FAILURES_BEFORE_SERVING + 1


CREATE = fs.CreateCollectionRequest(collection_id="c")
DELETE = fs.BatchDeleteFacesRequest(allow_missing=True)


@pytest.mark.parametrize(
    ("method", "call"),
    [
        ("CreateCollection", lambda c: c.create_collection(CREATE)),
        ("BatchDeleteFaces", lambda c: c.batch_delete_faces(DELETE)),
    ],
)
def test_a_call_that_is_not_always_idempotent_is_sent_once(
    flaky: tuple[FlakyFaceService, FaceClient], method: str, call: Any
) -> None:
    service, client = flaky
    with pytest.raises(grpc.RpcError) as error:
        call(client)
    assert error.value.code() == grpc.StatusCode.UNAVAILABLE  # type: ignore[attr-defined]
    assert service.calls[method] == 1


def index(client: FaceClient, request_id: str) -> Any:
    return client.index_faces(fs.IndexFacesRequest(parent="collections/c", request_id=request_id))


def search(client: FaceClient, request_id: str) -> Any:
    face = "collections/c/faces/f"
    return client.search_faces(fs.SearchFacesRequest(face=face, request_id=request_id))


@pytest.mark.parametrize(("method", "call"), [("IndexFaces", index), ("SearchFaces", search)])
def test_every_attempt_carries_one_request_id(
    flaky: tuple[FlakyFaceService, FaceClient], method: str, call: Any
) -> None:
    """IndexFaces and identification calls get a request_id once (a new one unless the
    caller gave one), so that the gateway answers a retry as the first attempt: one
    photo indexed, one identification recorded."""
    service, client = flaky
    call(client, "")
    sent = service.request_ids[method]
    assert len(sent) == FAILURES_BEFORE_SERVING + 1
    assert len(set(sent)) == 1
    assert uuid.UUID(sent[0])
    given = str(uuid.uuid4())
    service.calls.clear()
    service.request_ids.clear()
    call(client, given)
    assert set(service.request_ids[method]) == {given}
