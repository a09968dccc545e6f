"""Calls to detection, embedding and search: channels, deadlines, retries.

Used by the gateway and the ingest service. Every call gets the smaller of the
configured downstream deadline and what is left of the caller's :class:`Deadline`.
Only the methods the contract declares idempotent are retried (on UNAVAILABLE, by
gRPC's retry policy). Errors
come back to the caller with their rich details, field names translated to the
caller's request where they differ.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, TypeVar

import grpc

from facegrid import methods, tls
from facegrid.config import GatewaySettings, IngestSettings, Settings, TlsSettings
from facegrid.errors import relay, unavailable
from facegrid.identification.deadline import Deadline
from facegrid.internal.v1 import (
    detection_pb2,
    detection_pb2_grpc,
    embedding_pb2,
    embedding_pb2_grpc,
    search_pb2,
    search_pb2_grpc,
)
from facegrid.server import keepalive_ping_options
from facegrid.telemetry import grpc_client_interceptors

Response = TypeVar("Response")

_RETRY_POLICY = {
    "maxAttempts": 3,
    "initialBackoff": "0.05s",
    "maxBackoff": "0.5s",
    "backoffMultiplier": 2,
    "retryableStatusCodes": ["UNAVAILABLE"],
}


class Downstream:
    """Stubs of the three services the gateway orchestrates, on long-lived channels."""

    def __init__(
        self,
        *,
        detection_address: str,
        embedding_address: str,
        search_address: str,
        timeout_s: float,
        max_message_bytes: int,
        tls_settings: TlsSettings,
        channel_options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        self._timeout_s = timeout_s
        size = max_message_bytes
        options: list[tuple[str, Any]] = [
            *channel_options,
            ("grpc.max_receive_message_length", size),
            ("grpc.max_send_message_length", size),
            ("grpc.enable_retries", 1),
            # A call is retried only while its request fits the retry buffer (256 KiB by
            # default, less than many photos): past it, a replica that dies mid-call fails it.
            ("grpc.per_rpc_retry_buffer_size", 64 * 1024 * 1024),
            # Re-resolve a dns:/// name (new replicas) as soon as a connection is told
            # to go away (server.max_connection_age_s), not at most every 30 s.
            ("grpc.dns_min_time_between_resolutions_ms", 1000),
            # A restarted service is reconnected within about a second, not gRPC's
            # default backoff of up to two minutes.
            ("grpc.initial_reconnect_backoff_ms", 100),
            ("grpc.min_reconnect_backoff_ms", 100),
            ("grpc.max_reconnect_backoff_ms", 1000),
        ]
        # The methods the contract declares idempotent (their idempotency_level).
        retried = {
            name: methods.retry_policy_names(service.full_name)
            for name, service in (
                ("detection", detection_pb2.DESCRIPTOR.services_by_name["DetectionService"]),
                ("embedding", embedding_pb2.DESCRIPTOR.services_by_name["EmbeddingService"]),
                ("search", search_pb2.DESCRIPTOR.services_by_name["SearchService"]),
            )
        }
        addresses = {
            "detection": detection_address,
            "embedding": embedding_address,
            "search": search_address,
        }
        self._channels = [
            tls.aio_channel(
                addresses[name],
                tls_settings,
                [
                    *options,
                    ("grpc.service_config", methods.service_config(retried[name], _RETRY_POLICY)),
                ],
                grpc_client_interceptors(),
            )
            for name in ("detection", "embedding", "search")
        ]
        self.detection = detection_pb2_grpc.DetectionServiceStub(self._channels[0])
        self.embedding = embedding_pb2_grpc.EmbeddingServiceStub(self._channels[1])
        self.search = search_pb2_grpc.SearchServiceStub(self._channels[2])

    @classmethod
    def configured(cls, caller: GatewaySettings | IngestSettings, settings: Settings) -> Downstream:
        """The channels of a caller (the gateway or ingest) as its settings say: the three
        addresses and its downstream deadline; TLS, message size and keepalives shared."""
        return cls(
            detection_address=caller.detection_address,
            embedding_address=caller.embedding_address,
            search_address=caller.search_address,
            timeout_s=caller.downstream_timeout_s,
            max_message_bytes=settings.server.max_message_bytes,
            tls_settings=settings.tls,
            channel_options=keepalive_ping_options(settings.server),
        )

    async def call(
        self,
        method: Callable[..., Awaitable[Response]],
        request: Any,
        deadline: Deadline,
        service: str,
        renames: Mapping[str, str] | None = None,
    ) -> Response:
        """Call one downstream method within the caller's deadline; relay its errors."""
        try:
            return await method(request, timeout=deadline.timeout(self._timeout_s))
        except grpc.aio.AioRpcError as error:
            if error.code() == grpc.StatusCode.UNAVAILABLE:
                raise unavailable(
                    f"the {service} service is unavailable: {error.details()}",
                    f"{service.upper()}_UNAVAILABLE",
                    retry_after_ms=1000,
                ) from error
            raise relay(error, renames) from error

    async def close(self) -> None:
        for channel in self._channels:
            await channel.close()
