"""Fakes of the internal services, and a real gRPC server run in this process, for the
unit tests of the public services' policies (the gateway's, ingest's).

The fakes answer what a test sets in :class:`Fakes` and record every request, through
the real :class:`Downstream` calls (deadlines, error relay). The end-to-end suites
(tests/e2e/) run the same calls through the real services.
"""

from __future__ import annotations

import asyncio
import sys
import threading
from collections.abc import Callable, Coroutine, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import grpc
import numpy as np
from facegrid import methods
from facegrid.accountability import Gatekeeper
from facegrid.audit_log import open_audit_log
from facegrid.auth import ALL_SCOPES, bearer_metadata, create_token
from facegrid.authenticator import Authenticator
from facegrid.config import Settings, load_settings
from facegrid.identification.downstream import Downstream
from facegrid.internal.v1 import detection_pb2, embedding_pb2, search_pb2
from facegrid.server import FacegridServer
from facegrid.similarity import load_calibration
from facegrid.v1 import common_pb2, resources_pb2
from grpc_helpers import error_info

MODEL = "dlib_resnet_v1"
DEADLINE_S = 10.0
T = TypeVar("T")


def face(sharpness: float = 80.0, size: int = 200) -> common_pb2.FaceDetail:
    return common_pb2.FaceDetail(
        bounding_box=common_pb2.BoundingBox(left=10, top=10, width=size, height=size),
        confidence=99.0,
        quality=common_pb2.FaceQuality(
            sharpness=sharpness,
            brightness=50.0,
            face_size=size,
            inter_eye_distance=size * 0.4,
            yaw=0.0,
            pitch=0.0,
            roll=0.0,
        ),
        chip=common_pb2.Chip(rgb=b"\0" * 12, width=2, height=2),
    )


def unit(seed: int) -> list[float]:
    vector = np.random.default_rng(seed).normal(size=128)
    return [float(v) for v in vector / np.linalg.norm(vector)]


@dataclass
class Fakes:
    """What the fake services answer, and every request they were sent."""

    faces: list[common_pb2.FaceDetail] = field(default_factory=lambda: [face()])
    collection_minimum: float | None = None
    production: bool = False
    search_error: grpc.StatusCode | None = None
    requests: list[Any] = field(default_factory=list)

    def reset(self) -> None:
        self.faces = [face()]
        self.collection_minimum = None
        self.production = False
        self.search_error = None
        self.requests.clear()

    def sent(self, kind: type) -> list[Any]:
        return [r for r in self.requests if isinstance(r, kind)]


class FakeDetection:
    def __init__(self, fakes: Fakes) -> None:
        self.fakes = fakes

    async def DetectFaces(self, request: Any, timeout: float) -> Any:  # noqa: N802
        self.fakes.requests.append(request)
        faces = self.fakes.faces[: request.max_faces]
        return detection_pb2.DetectFacesResponse(
            faces=faces, image_width=640, image_height=480, model_version="dlib_mmod_v1"
        )


class FakeEmbedding:
    def __init__(self, fakes: Fakes) -> None:
        self.fakes = fakes

    async def GetModelInfo(self, request: Any, timeout: float) -> Any:  # noqa: N802
        record = load_calibration(MODEL)
        assert record is not None
        return embedding_pb2.GetModelInfoResponse(
            model_version=MODEL, dimension=128, similarity_calibration=record.message
        )

    async def EmbedChips(self, request: Any, timeout: float) -> Any:  # noqa: N802
        self.fakes.requests.append(request)
        return embedding_pb2.EmbedChipsResponse(
            embeddings=[common_pb2.Embedding(values=unit(i)) for i in range(len(request.chips))],
            model_version=MODEL,
        )


class FakeSearch:
    def __init__(self, fakes: Fakes) -> None:
        self.fakes = fakes

    async def GetCollection(self, request: Any, timeout: float) -> Any:  # noqa: N802
        record = load_calibration(MODEL)
        assert record is not None
        collection = resources_pb2.Collection(
            name=request.name,
            dimension=128,
            model_version=MODEL,
            similarity_calibration=record.message,
            face_count=1000,
            production=self.fakes.production,
        )
        if self.fakes.collection_minimum is not None:
            collection.min_match_threshold = self.fakes.collection_minimum
        return search_pb2.GetCollectionResponse(collection=collection)

    async def SearchFaces(self, request: Any, timeout: float) -> Any:  # noqa: N802
        self.fakes.requests.append(request)
        if self.fakes.search_error is not None:
            raise grpc.aio.AioRpcError(
                self.fakes.search_error, grpc.aio.Metadata(), grpc.aio.Metadata(), "fake"
            )
        match = resources_pb2.FaceMatch(
            face=resources_pb2.Face(name=f"{request.parent}/faces/f1", model_version=MODEL),
            cosine_similarity=0.99,
            similarity=max(request.min_similarity, 99.0),
        )
        return search_pb2.SearchFacesResponse(
            results=[search_pb2.SearchFacesResponse.QueryResult(matches=[match])]
        )


class FakeDownstream(Downstream):
    """The real Downstream's calls (deadlines, error relay) over fake stubs."""

    def __init__(self, fakes: Fakes) -> None:
        self._timeout_s = DEADLINE_S
        self._channels = []
        self.detection = FakeDetection(fakes)  # type: ignore[assignment]
        self.embedding = FakeEmbedding(fakes)  # type: ignore[assignment]
        self.search = FakeSearch(fakes)  # type: ignore[assignment]


@dataclass
class PublicSetup:
    """What a public service needs in a test: settings with a credentials file and an
    SQLite audit log in ``work``, and a token with every scope ("all") and, for each
    scope, one with every scope but that ("no <scope>"), of principal "without-<scope>"."""

    settings: Settings
    tokens: dict[str, str]

    @classmethod
    def in_directory(cls, work: Path) -> PublicSetup:
        credentials = work / "credentials.json"
        tokens = {"all": create_token(credentials, "examiner", ALL_SCOPES)}
        for scope in ALL_SCOPES:
            others = [s for s in ALL_SCOPES if s != scope]
            tokens[f"no {scope}"] = create_token(credentials, f"without-{scope}", others)
        settings = load_settings(
            [f"gateway.credentials_file={credentials}", f"gateway.audit_path={work / 'audit.db'}"]
        )
        return cls(settings, tokens)

    def gatekeeper(self, service_name: str) -> Gatekeeper:
        """The service's gatekeeper, with the audit log it writes (close it after)."""
        gateway = self.settings.gateway
        callers = Authenticator.configured(gateway.credentials_file, self.settings.oidc)
        return Gatekeeper(callers, open_audit_log(gateway), service_name)


class ServerThread:
    """A FacegridServer on 127.0.0.1 (a free port) in an event loop of its own thread,
    so that tests call it with the ordinary blocking gRPC client."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        """Run a coroutine in the server's loop; its result."""
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout=30)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()


@contextmanager
def serving(thread: ServerThread, build: Callable[[], FacegridServer]) -> Iterator[str]:
    """The server ``build`` makes (in ``thread``'s loop: grpc.aio servers belong to the
    loop they are made in), started; its address; stopped on exit."""

    async def start() -> FacegridServer:
        server = build()
        await server.start()
        return server

    server = thread.run(start())
    try:
        yield server.address
    finally:
        thread.run(server.stop(0))


def call_any_method(
    address: str, facts: methods.MethodFacts, metadata: list[tuple[str, str]]
) -> grpc.RpcError | None:
    """Call one method of a service with an empty request (streams: one empty message),
    as a generic client; the error it ended with, None if it succeeded."""
    descriptor = methods.service_descriptor(facts.service).methods_by_name[facts.name]
    proto_file = descriptor.containing_service.file.name  # facegrid/v1/ingest.proto
    module = sys.modules[proto_file.replace("/", ".").removesuffix(".proto") + "_pb2"]
    request_class = getattr(module, descriptor.input_type.name)
    response_class = getattr(module, descriptor.output_type.name)
    path = f"/{facts.service}/{facts.name}"
    codec = (request_class.SerializeToString, response_class.FromString)
    with grpc.insecure_channel(address) as channel:
        try:
            if descriptor.client_streaming:
                channel.stream_unary(path, *codec)(
                    iter([request_class()]), timeout=DEADLINE_S, metadata=metadata
                )
            elif descriptor.server_streaming:
                list(
                    channel.unary_stream(path, *codec)(
                        request_class(), timeout=DEADLINE_S, metadata=metadata
                    )
                )
            else:
                channel.unary_unary(path, *codec)(
                    request_class(), timeout=DEADLINE_S, metadata=metadata
                )
        except grpc.RpcError as error:
            return error
    return None


def assert_needs_its_scope(address: str, facts: methods.MethodFacts, setup: PublicSetup) -> None:
    """Without its scope a method is PERMISSION_DENIED (MISSING_SCOPE naming the scope);
    without credentials, UNAUTHENTICATED."""
    token = setup.tokens[f"no {facts.required_scope}"]
    error = call_any_method(address, facts, bearer_metadata(token))
    assert error is not None, f"{facts.name} answered without its scope"
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED, error.details()
    info = error_info(error)
    assert (info.reason, dict(info.metadata)) == ("MISSING_SCOPE", {"scope": facts.required_scope})
    anonymous = call_any_method(address, facts, [])
    assert anonymous is not None
    assert anonymous.code() == grpc.StatusCode.UNAUTHENTICATED
