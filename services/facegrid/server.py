"""gRPC server bootstrap shared by every facegrid service.

One function builds an asyncio gRPC server with what every service needs: the
``grpc.health.v1`` service, server reflection, a bound on concurrent calls (beyond it
gRPC answers RESOURCE_EXHAUSTED), a default deadline for calls that bring none, rich
error statuses from :class:`facegrid.errors.ServiceError`, an OpenTelemetry span, the
RPC metrics and one log line per call, and a graceful stop on SIGTERM/SIGINT (health
turns NOT_SERVING, a drain pause, then in-flight calls get a grace period).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import grpc
from google.rpc import error_details_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from grpc_status import rpc_status

from facegrid import diagnostics, tls
from facegrid.config import ServerSettings, Settings, TlsSettings
from facegrid.errors import ServiceError, internal
from facegrid.logs import log_rpc
from facegrid.metrics import RPC_ERRORS, RPC_IN_FLIGHT, RPC_LATENCY, RPC_REQUESTS
from facegrid.tasks import cancel_and_wait
from facegrid.telemetry import grpc_server_interceptor

log = logging.getLogger(__name__)
rpc_log = logging.getLogger("facegrid.rpc")
_INFRASTRUCTURE = ("/grpc.health.v1.Health/", "/grpc.reflection.")

# A call that arrives without a deadline still gets one, so no call can hold a worker
# forever.
DEFAULT_DEADLINE_S = 60.0


@dataclass(frozen=True)
class ServiceRegistration:
    """One gRPC service to serve: its full name and how to add it to a server."""

    full_name: str
    add_to_server: Callable[[grpc.aio.Server], None]

    @classmethod
    def of(
        cls,
        module: ModuleType,
        service: str,
        add: Callable[[Any, grpc.aio.Server], None],
        servicer: object,
    ) -> ServiceRegistration:
        """From a generated ``*_pb2`` module, the service's name and its ``add_*`` function."""
        full_name = module.DESCRIPTOR.services_by_name[service].full_name
        return cls(full_name, lambda server: add(servicer, server))


class CallInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Per call: rich error statuses from ServiceError, a time bound, metrics, one log line."""

    def __init__(self, service: str) -> None:
        self._service = service

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None or handler_call_details.method.startswith(_INFRASTRUCTURE):
            return handler  # health probes and reflection: neither counted nor logged
        call = _CallRecorder(self._service, handler_call_details.method)
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                _wrap_unary(handler.unary_unary, call),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.stream_unary:
            # A client stream (PushFrames from a camera) may last hours: only the
            # caller's deadline applies, as for server streams.
            return grpc.stream_unary_rpc_method_handler(
                _wrap_unary(handler.stream_unary, call, default_deadline_s=None),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                _wrap_stream(handler.unary_stream, call),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.stream_stream:
            return grpc.stream_stream_rpc_method_handler(
                _wrap_stream(handler.stream_stream, call),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler


@dataclass(frozen=True)
class _CallRecorder:
    """Counts, times and logs the calls of one method (never their contents)."""

    service: str
    method: str

    def record(
        self,
        started: float,
        code: grpc.StatusCode,
        reason: str = "",
    ) -> None:
        elapsed = time.perf_counter() - started
        name = code.name
        RPC_REQUESTS.labels(self.service, self.method, name).inc()
        RPC_LATENCY.labels(self.service, self.method).observe(elapsed)
        if code != grpc.StatusCode.OK:
            RPC_ERRORS.labels(self.service, self.method, name).inc()
        fields = {"reason": reason} if reason else {}
        # No peer address: a caller's IP address can be personal data (the audit log
        # keeps it for identification calls, where accountability needs it).
        log_rpc(rpc_log, method=self.method, code=name, duration_ms=elapsed * 1000.0, **fields)


def _reason(error: ServiceError) -> str:
    for detail in error.details:
        if isinstance(detail, error_details_pb2.ErrorInfo):
            return str(detail.reason)
    return ""


@contextlib.asynccontextmanager
async def _recorded(context: grpc.aio.ServicerContext, call: _CallRecorder) -> AsyncIterator[None]:
    """How a call ends, as its status and its record: a ServiceError becomes its rich
    status, running out of time DEADLINE_EXCEEDED, anything unexpected INTERNAL (logged,
    never shown); the code, time and reason are counted and logged."""
    started = time.perf_counter()
    code, reason = grpc.StatusCode.OK, ""
    in_flight = RPC_IN_FLIGHT.labels(call.service, call.method)
    in_flight.inc()
    try:
        yield
    except ServiceError as exc:
        code, reason = exc.code, _reason(exc)
        await _abort(context, exc)
    except TimeoutError:
        code = grpc.StatusCode.DEADLINE_EXCEEDED
        await _abort(context, _deadline_error(call.method))
    except asyncio.CancelledError:
        code = grpc.StatusCode.CANCELLED
        raise
    except Exception as exc:
        if _is_abort(exc):
            code = context.code() or grpc.StatusCode.UNKNOWN
            raise
        code = grpc.StatusCode.INTERNAL
        log.exception("unhandled error in %s", call.method)
        await _abort(context, internal(f"internal error in {call.method}"))
    finally:
        in_flight.dec()
        call.record(started, code, reason)


def _wrap_unary(
    inner: Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]],
    call: _CallRecorder,
    default_deadline_s: float | None = DEFAULT_DEADLINE_S,
) -> Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]]:
    async def run(request: Any, context: grpc.aio.ServicerContext) -> Any:
        async with _recorded(context, call):
            async with asyncio.timeout(_time_budget(context, default_deadline_s)):
                return await inner(request, context)
        return None  # unreachable: a failed call is aborted

    return run


def _wrap_stream(
    inner: Callable[[Any, grpc.aio.ServicerContext], AsyncIterator[Any]], call: _CallRecorder
) -> Callable[[Any, grpc.aio.ServicerContext], AsyncIterator[Any]]:
    async def run(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        # Streams (watchers) may be long-lived: only the caller's deadline applies.
        async with _recorded(context, call):
            async for item in inner(request, context):
                yield item

    return run


def _time_budget(
    context: grpc.aio.ServicerContext, default_s: float | None = DEFAULT_DEADLINE_S
) -> float | None:
    remaining = context.time_remaining()
    return default_s if remaining is None else max(0.0, remaining)


def _deadline_error(method: str) -> ServiceError:
    return ServiceError(grpc.StatusCode.DEADLINE_EXCEEDED, f"{method} ran out of time")


def _is_abort(exc: BaseException) -> bool:
    # context.abort() raises a private exception type that must propagate untouched.
    return type(exc).__name__ == "AbortError"


async def _abort(context: grpc.aio.ServicerContext, error: ServiceError) -> None:
    await context.abort_with_status(rpc_status.to_status(error.to_status()))


def server_options(settings: ServerSettings) -> list[tuple[str, int]]:
    """gRPC core options of every facegrid server: sizes, connection age, keep-alive."""
    options = [
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.max_send_message_length", settings.max_message_bytes),
        ("grpc.so_reuseport", 0),
        ("grpc.keepalive_time_ms", int(settings.keepalive_time_s * 1000)),
        ("grpc.keepalive_timeout_ms", int(settings.keepalive_timeout_s * 1000)),
        ("grpc.keepalive_permit_without_calls", 1),
        # Clients ping as often as the server does (keepalive_ping_options); gRPC's own
        # floor of 5 minutes would answer them with GOAWAY "too_many_pings".
        (
            "grpc.http2.min_ping_interval_without_data_ms",
            int(min(settings.keepalive_time_s, 10.0) * 1000),
        ),
        ("grpc.http2.max_ping_strikes", 0),
    ]
    if settings.max_connection_age_s > 0:
        options.append(("grpc.max_connection_age_ms", int(settings.max_connection_age_s * 1000)))
        if settings.max_connection_age_grace_s > 0:
            grace_ms = int(settings.max_connection_age_grace_s * 1000)
            options.append(("grpc.max_connection_age_grace_ms", grace_ms))
    return options


def keepalive_ping_options(settings: ServerSettings) -> list[tuple[str, int]]:
    """Keep-alive of the channels one facegrid service opens to another."""
    return [
        ("grpc.keepalive_time_ms", int(settings.keepalive_time_s * 1000)),
        ("grpc.keepalive_timeout_ms", int(settings.keepalive_timeout_s * 1000)),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
    ]


class _HealthServicer(health.aio.HealthServicer):  # type: ignore[misc]  # grpc_health is untyped
    """grpc's health servicer, whose Watch streams end (status OK) once the server stops.

    Left open, the server's stop would cancel them, and grpc logs each cancelled stream
    as an error with an asyncio CancelledError traceback, on every clean stop.
    """

    def __init__(self) -> None:
        super().__init__()
        self._closing = asyncio.Event()

    async def Watch(  # noqa: N802 (the gRPC method's name)
        self,
        request: health_pb2.HealthCheckRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> None:
        watch = asyncio.create_task(
            super().Watch(request, context), name="grpc.health.v1.Health/Watch"
        )
        closing = asyncio.ensure_future(self._closing.wait())
        try:
            await asyncio.wait((watch, closing), return_when=asyncio.FIRST_COMPLETED)
        finally:
            await cancel_and_wait((watch, closing), what="health watch")

    def close_watches(self) -> None:
        """End every Watch stream (they have been told NOT_SERVING already)."""
        self._closing.set()


class FacegridServer:
    """A running service: server, health status and graceful shutdown."""

    def __init__(
        self,
        name: str,
        registrations: Sequence[ServiceRegistration],
        settings: ServerSettings,
        port: int,
        max_concurrent_rpcs: int,
        tls_settings: TlsSettings,
    ) -> None:
        self.name = name
        self.settings = settings
        self.health = _HealthServicer()
        self._names = [r.full_name for r in registrations]
        self.server = grpc.aio.server(
            # OpenTelemetry's first, so that the call's span is current in ours.
            interceptors=[grpc_server_interceptor(), CallInterceptor(name)],
            maximum_concurrent_rpcs=max_concurrent_rpcs,
            options=server_options(settings),
        )
        for registration in registrations:
            registration.add_to_server(self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            [*self._names, health.SERVICE_NAME, reflection.SERVICE_NAME], self.server
        )
        credentials = tls.server_credentials(tls_settings)
        if credentials is None:
            tls.check_plaintext_allowed(name, settings.host)
            self.port = self.server.add_insecure_port(f"{settings.host}:{port}")
        else:
            self.port = self.server.add_secure_port(f"{settings.host}:{port}", credentials)
        self.tls = credentials is not None
        if self.port == 0:
            raise RuntimeError(f"{name}: cannot bind {settings.host}:{port}")
        # Kubernetes' gRPC probes speak plaintext only: health (and nothing else) can be
        # served on a port of its own, without TLS; it tells only SERVING or not.
        self._health_server: grpc.aio.Server | None = None
        if settings.health_port:
            self._health_server = grpc.aio.server()
            health_pb2_grpc.add_HealthServicer_to_server(self.health, self._health_server)
            if not self._health_server.add_insecure_port(f"{settings.host}:{settings.health_port}"):
                raise RuntimeError(f"{name}: cannot bind {settings.host}:{settings.health_port}")
        self._stopped = asyncio.Event()

    @classmethod
    def for_service(
        cls, name: str, registration: ServiceRegistration, settings: Settings, port: int | None
    ) -> FacegridServer:
        """Service ``name``'s server of its one gRPC service: on ``<name>.port`` (or
        ``port``), at most ``<name>.max_concurrent_rpcs`` calls at once."""
        section = getattr(settings, name)
        return cls(
            name,
            [registration],
            settings.server,
            section.port if port is None else port,
            section.max_concurrent_rpcs,
            settings.tls,
        )

    @property
    def address(self) -> str:
        return f"{self.settings.host}:{self.port}"

    async def start(self) -> None:
        await self.server.start()
        if self._health_server is not None:
            await self._health_server.start()
        await self._set_status(health_pb2.HealthCheckResponse.SERVING)
        transport = "TLS" if self.tls else "plaintext"
        log.info("%s listening on %s (%s)", self.name, self.address, transport)

    async def stop(self, grace_s: float | None = None) -> None:
        """Stop taking calls (NOT_SERVING), let in-flight calls finish, then stop."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        await self.health.enter_graceful_shutdown()
        log.info("%s draining: health is NOT_SERVING", self.name)
        await asyncio.sleep(self.settings.drain_s)
        self.health.close_watches()
        grace = self.settings.grace_period_s if grace_s is None else grace_s
        await self.server.stop(grace)
        if self._health_server is not None:
            await self._health_server.stop(0)
        log.info("%s stopped", self.name)

    async def wait(self) -> None:
        await self.server.wait_for_termination()

    def install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, lambda: asyncio.ensure_future(self.stop()))
        diagnostics.install_stack_dumps(loop)

    async def _set_status(self, status: int) -> None:
        for service in ["", *self._names]:
            await self.health.set(service, status)


async def run_until_stopped(server: FacegridServer, on_stop: Callable[[], Awaitable[None]]) -> None:
    """Start, serve until SIGTERM/SIGINT, stop gracefully, then release resources."""
    await server.start()
    server.install_signal_handlers()
    try:
        await server.wait()
    finally:
        await on_stop()
