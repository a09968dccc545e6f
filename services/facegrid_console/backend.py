"""The console's calls to the gateway (FaceService) and ingest (IngestService).

Each call carries the signed-in person's bearer token and a deadline
(``console.call_timeout_s``); the channels retry, on UNAVAILABLE, only the methods the
contract declares idempotent (facegrid.methods). A failed call becomes a
:class:`CallError` with the status and its ``google.rpc`` details as plain lines, which
the page shows.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import Any, TypeVar

import grpc
from facegrid import methods, tls
from facegrid.auth import bearer_metadata
from facegrid.config import Settings
from facegrid.rpc_errors import describe_rpc_error
from facegrid.telemetry import grpc_client_interceptors
from facegrid.v1 import face_service_pb2_grpc, ingest_pb2, ingest_pb2_grpc
from google.protobuf.message import Message

R = TypeVar("R", bound=Message)

_RETRY_POLICY = {
    "maxAttempts": 3,
    "initialBackoff": "0.2s",
    "maxBackoff": "1s",
    "backoffMultiplier": 2,
    "retryableStatusCodes": ["UNAVAILABLE"],
}
# HTTP status of a page whose call failed with this gRPC status.
_HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.FAILED_PRECONDITION: 409,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.UNAVAILABLE: 503,
}


class CallError(Exception):
    """A call the gateway or ingest refused or could not answer."""

    def __init__(self, error: grpc.RpcError) -> None:
        code = error.code() if callable(getattr(error, "code", None)) else None
        self.code: grpc.StatusCode = code if code is not None else grpc.StatusCode.UNKNOWN
        self.lines = describe_rpc_error(error)
        super().__init__(self.lines[0])

    @property
    def http_status(self) -> int:
        return _HTTP_STATUS.get(self.code, 502)


class Backend:
    def __init__(self, settings: Settings) -> None:
        console = settings.console
        self.timeout_s = console.call_timeout_s
        size = settings.server.max_message_bytes
        options: list[tuple[str, Any]] = [
            ("grpc.max_send_message_length", size),
            ("grpc.max_receive_message_length", size),
            ("grpc.per_rpc_retry_buffer_size", size),
            ("grpc.max_reconnect_backoff_ms", 1000),
        ]
        if console.tls_server_name:
            options.append(("grpc.ssl_target_name_override", console.tls_server_name))

        def channel(address: str, service: str) -> grpc.aio.Channel:
            # Every request_id-idempotent call the console makes carries one (searches,
            # enrolments, decisions), so those are retried too.
            retried = methods.retry_policy_names(service, always_sent_with=["request_id"])
            config = methods.service_config(retried, _RETRY_POLICY)
            return tls.aio_channel(
                address,
                settings.tls,
                [*options, ("grpc.service_config", config)],
                grpc_client_interceptors(),
            )

        self._channels = [
            channel(console.gateway_address, "facegrid.v1.FaceService"),
            channel(console.ingest_address, "facegrid.v1.IngestService"),
        ]
        self.faces = face_service_pb2_grpc.FaceServiceStub(self._channels[0])
        self.ingest = ingest_pb2_grpc.IngestServiceStub(self._channels[1])

    async def call(self, stub: Any, method: str, request: Message, token: str) -> Any:
        """``stub.method(request)`` as the person with ``token``; CallError if refused."""
        try:
            return await getattr(stub, method)(
                request, metadata=bearer_metadata(token), timeout=self.timeout_s
            )
        except grpc.aio.AioRpcError as error:
            raise CallError(error) from error

    async def face(self, method: str, request: Message, token: str) -> Any:
        return await self.call(self.faces, method, request, token)

    async def match_events(
        self, request: ingest_pb2.StreamMatchEventsRequest, token: str
    ) -> AsyncGenerator[ingest_pb2.StreamMatchEventsResponse, None]:
        """The server stream of match events, as long as it lasts (no deadline: the
        server sends a heartbeat every 30 s and the page's end cancels it)."""
        stream = self.ingest.StreamMatchEvents(request, metadata=bearer_metadata(token))
        try:
            async for reply in stream:
                yield reply
        except grpc.aio.AioRpcError as error:
            raise CallError(error) from error
        finally:
            stream.cancel()

    async def close(self) -> None:
        for channel in self._channels:
            await channel.close()
