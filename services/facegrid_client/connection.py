"""One connection to the gateway: channel, token, deadlines, retries and error text.

Every FaceService call of the client goes through :class:`FaceClient`, so that each one
carries the bearer token and a deadline, only idempotent calls are retried (gRPC's
retry policy on UNAVAILABLE, with exponential backoff, as common.proto asks, for the
methods the contract declares idempotent: :mod:`facegrid.methods`), and a failure can be
shown as a few plain lines: the status code, the message and the ``google.rpc``
details (field violations, reasons), never a traceback.
"""

from __future__ import annotations

import functools
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import grpc
from facegrid import methods, tls
from facegrid.auth import bearer_metadata
from facegrid.v1 import face_service_pb2 as fs
from facegrid.v1 import face_service_pb2_grpc
from google.protobuf.message import Message

DEFAULT_DEADLINE_S = 60.0
# Images may be 15 MiB encoded and the gateway accepts 32 MiB messages.
MAX_MESSAGE_BYTES = 32 * 1024 * 1024
# Retries of idempotent calls on UNAVAILABLE: a gateway restarting or a replica going.
RETRY_POLICY = {
    "maxAttempts": 3,
    "initialBackoff": "0.5s",
    "maxBackoff": "2s",
    "backoffMultiplier": 2,
    "retryableStatusCodes": ["UNAVAILABLE"],
}

R = TypeVar("R", bound=Message)


class ClientError(Exception):
    """A problem with what the user asked for, shown as one line (no traceback)."""


def default_address() -> str:
    """The local gateway: 127.0.0.1 and the configured ``gateway.port``.

    Read at call time, not when the parser is built, so that a bad setting in the
    environment does not break ``facegrid --help``.
    """
    from facegrid.config import load_settings

    return f"127.0.0.1:{load_settings().gateway.port}"


# Behind a DNS name with several replicas (dns:///gateway.example:50050): calls spread
# over all of them, a draining one (NOT_SERVING) gets none, and the name is re-resolved
# as soon as a server asks the client to reconnect (its maximum connection age). The
# FaceService and IngestService methods retried: those the contract declares
# idempotent, and IndexFaces, which FaceClient always sends with a request_id (its
# idempotent_when). BatchDeleteFaces is idempotent only with allow_missing, which the
# client cannot choose for the caller: it is not retried.
@functools.cache
def _service_config() -> str:
    from facegrid.v1 import ingest_pb2  # noqa: F401  (its services in the descriptor pool)

    return methods.service_config(
        [
            *methods.retry_policy_names("facegrid.v1.FaceService", always_sent_with=["request_id"]),
            *methods.retry_policy_names("facegrid.v1.IngestService"),
        ],
        RETRY_POLICY,
    )


def open_channel(address: str) -> grpc.Channel:
    options: list[tuple[str, Any]] = [
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.service_config", _service_config()),
        ("grpc.dns_min_time_between_resolutions_ms", 1000),
        # A call is retried only while its request fits the retry buffer (256 KiB by
        # default, less than many photos): past it, a replica that dies mid-call fails it.
        ("grpc.per_rpc_retry_buffer_size", 64 * 1024 * 1024),
        # A restarted replica is reconnected within about a second (gRPC's default
        # backoff grows to two minutes, during which only the other replicas serve).
        ("grpc.initial_reconnect_backoff_ms", 100),
        ("grpc.min_reconnect_backoff_ms", 100),
        ("grpc.max_reconnect_backoff_ms", 1000),
    ]
    from facegrid.config import load_settings

    # TLS as configured (tls.ca_file, tls.client_cert_file): read at call time, as above.
    return tls.channel(address, load_settings().tls, options)


Client = TypeVar("Client", bound="ServiceClient")


class ServiceClient:
    """Calls of one gRPC service with the caller's token and a deadline on every one;
    the channel (:func:`open_channel`) retries the idempotent ones. Subclasses name
    their stub class and methods."""

    stub_class: Callable[[grpc.Channel], Any]

    def __init__(self, stub: Any, token: str, deadline_s: float = DEFAULT_DEADLINE_S) -> None:
        self.stub = stub
        self.metadata = bearer_metadata(token)
        self.deadline_s = deadline_s

    @classmethod
    @contextmanager
    def connect(
        cls: type[Client], address: str, token: str, deadline_s: float = DEFAULT_DEADLINE_S
    ) -> Iterator[Client]:
        """A client on a new channel to ``address``, closed on exit."""
        with open_channel(address) as channel:
            yield cls(cls.stub_class(channel), token, deadline_s)

    def _call(self, method: str, request: Message, response: type[R]) -> R:
        reply = getattr(self.stub, method)(request, metadata=self.metadata, timeout=self.deadline_s)
        if not isinstance(reply, response):
            raise TypeError(f"{method} returned {type(reply).__name__}")
        return reply


class FaceClient(ServiceClient):
    """FaceService calls with the caller's token and a deadline on every one.

    ``stub`` is a ``FaceServiceStub`` or anything with the same methods (tests pass an
    in-memory fake). Identification calls and IndexFaces are sent with a
    ``request_id`` (a new one unless the request has one), so that a retry is
    answered as the first attempt was: the gateway records an identification once and
    indexes a photo once.
    """

    stub_class = face_service_pb2_grpc.FaceServiceStub

    # -- detection and comparison ------------------------------------------------
    def detect_faces(self, request: fs.DetectFacesRequest) -> fs.DetectFacesResponse:
        return self._call("DetectFaces", request, fs.DetectFacesResponse)

    def compare_faces(self, request: fs.CompareFacesRequest) -> fs.CompareFacesResponse:
        return self._call("CompareFaces", with_request_id(request), fs.CompareFacesResponse)

    # -- collections ---------------------------------------------------------------
    def create_collection(self, request: fs.CreateCollectionRequest) -> fs.CreateCollectionResponse:
        return self._call("CreateCollection", request, fs.CreateCollectionResponse)

    def get_collection(self, request: fs.GetCollectionRequest) -> fs.GetCollectionResponse:
        return self._call("GetCollection", request, fs.GetCollectionResponse)

    def list_collections(self, request: fs.ListCollectionsRequest) -> fs.ListCollectionsResponse:
        return self._call("ListCollections", request, fs.ListCollectionsResponse)

    def update_collection(self, request: fs.UpdateCollectionRequest) -> fs.UpdateCollectionResponse:
        return self._call("UpdateCollection", request, fs.UpdateCollectionResponse)

    def delete_collection(self, request: fs.DeleteCollectionRequest) -> fs.DeleteCollectionResponse:
        return self._call("DeleteCollection", request, fs.DeleteCollectionResponse)

    # -- faces -------------------------------------------------------------------------
    def index_faces(self, request: fs.IndexFacesRequest) -> fs.IndexFacesResponse:
        # Always with a request_id (the contract's idempotent_when), which makes it safe
        # to retry: without one, a retry could index the photo twice.
        return self._call("IndexFaces", with_request_id(request), fs.IndexFacesResponse)

    def get_face(self, request: fs.GetFaceRequest) -> fs.GetFaceResponse:
        return self._call("GetFace", request, fs.GetFaceResponse)

    def list_faces(self, request: fs.ListFacesRequest) -> fs.ListFacesResponse:
        return self._call("ListFaces", request, fs.ListFacesResponse)

    def batch_delete_faces(
        self, request: fs.BatchDeleteFacesRequest
    ) -> fs.BatchDeleteFacesResponse:
        return self._call("BatchDeleteFaces", request, fs.BatchDeleteFacesResponse)

    def search_faces(self, request: fs.SearchFacesRequest) -> fs.SearchFacesResponse:
        return self._call("SearchFaces", with_request_id(request), fs.SearchFacesResponse)

    def search_faces_by_image(
        self, request: fs.SearchFacesByImageRequest
    ) -> fs.SearchFacesByImageResponse:
        return self._call(
            "SearchFacesByImage", with_request_id(request), fs.SearchFacesByImageResponse
        )

    # -- subjects ------------------------------------------------------------------
    def create_subject(self, request: fs.CreateSubjectRequest) -> fs.CreateSubjectResponse:
        return self._call("CreateSubject", request, fs.CreateSubjectResponse)

    def get_subject(self, request: fs.GetSubjectRequest) -> fs.GetSubjectResponse:
        return self._call("GetSubject", request, fs.GetSubjectResponse)

    def list_subjects(self, request: fs.ListSubjectsRequest) -> fs.ListSubjectsResponse:
        return self._call("ListSubjects", request, fs.ListSubjectsResponse)

    def delete_subject(self, request: fs.DeleteSubjectRequest) -> fs.DeleteSubjectResponse:
        return self._call("DeleteSubject", request, fs.DeleteSubjectResponse)

    def search_subjects_by_image(
        self, request: fs.SearchSubjectsByImageRequest
    ) -> fs.SearchSubjectsByImageResponse:
        return self._call(
            "SearchSubjectsByImage",
            with_request_id(request),
            fs.SearchSubjectsByImageResponse,
        )

    # -- audit -----------------------------------------------------------------------
    def list_audit_records(
        self, request: fs.ListAuditRecordsRequest
    ) -> fs.ListAuditRecordsResponse:
        return self._call("ListAuditRecords", request, fs.ListAuditRecordsResponse)

    def get_audit_checkpoint(self) -> fs.GetAuditCheckpointResponse:
        return self._call(
            "GetAuditCheckpoint",
            fs.GetAuditCheckpointRequest(),
            fs.GetAuditCheckpointResponse,
        )


M = TypeVar("M", bound=Message)


def with_request_id(request: M) -> M:
    """The request with a request_id: its own, or a copy with a new one."""
    if request.request_id:  # type: ignore[attr-defined]
        return request
    copy = type(request)()
    copy.CopyFrom(request)
    copy.request_id = str(uuid.uuid4())  # type: ignore[attr-defined]
    return copy
