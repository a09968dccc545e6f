"""Tracing: one place that sets up OpenTelemetry for a service.

Configured the OpenTelemetry way, by the standard ``OTEL_*`` environment variables:
spans are exported with OTLP over gRPC when ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` or
``OTEL_EXPORTER_OTLP_ENDPOINT`` is set (the exporter reads its endpoint, headers,
certificates and timeout from them), and not at all otherwise; ``OTEL_SDK_DISABLED=true``
or ``OTEL_TRACES_EXPORTER=none`` turn tracing off; ``OTEL_TRACES_SAMPLER`` picks the
sampler (default: parent-based, always on). W3C trace context (``traceparent``) is
read from incoming gRPC metadata and written to outgoing calls, Triton's included.

Spans carry ids, counts, sizes, model names and similarities, never images,
embeddings, names, case ids or other personal data.
"""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import grpc
from opentelemetry import propagate, trace
from opentelemetry.instrumentation.grpc import (
    aio_client_interceptors,
    aio_server_interceptor,
    filters,
)
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor

log = logging.getLogger(__name__)

TRACER_NAME = "facegrid"
_ENDPOINT_VARIABLES = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")


def exporting() -> bool:
    """Whether the environment asks for spans to be exported."""
    if os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    if os.environ.get("OTEL_TRACES_EXPORTER", "otlp").strip().lower() == "none":
        return False
    return any(os.environ.get(name) for name in _ENDPOINT_VARIABLES)


def setup_tracing(service: str) -> TracerProvider | None:
    """Install the tracer provider of ``service``; None when nothing is exported.

    Without a provider the API's no-op tracer is used: spans cost next to nothing, and
    trace context still flows through (the propagator works without the SDK).
    """
    if not exporting():
        return None
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

    resource = Resource.create(
        {
            "service.name": f"facegrid-{service}",
            "service.namespace": "facegrid",
            "service.instance.id": str(uuid.uuid4()),
        }
    )
    provider = TracerProvider(resource=resource)
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)
    log.info("exporting traces with OTLP/gRPC", extra={"fields": {"service": service}})
    return provider


def shutdown_tracing(provider: TracerProvider | None) -> None:
    """Flush and stop the exporter (on a clean stop, so no span is lost)."""
    if provider is not None:
        provider.shutdown()


def tracer() -> trace.Tracer:
    return trace.get_tracer(TRACER_NAME)


@contextmanager
def span(
    name: str, kind: trace.SpanKind = trace.SpanKind.INTERNAL, **attributes: Any
) -> Iterator[trace.Span]:
    """A child span of the current one, with ``facegrid.*`` attributes."""
    with tracer().start_as_current_span(
        name, kind=kind, attributes={f"facegrid.{k}": v for k, v in attributes.items()}
    ) as current:
        yield current


def annotate(**attributes: Any) -> None:
    """Add ``facegrid.*`` attributes to the current span (no-op without one)."""
    current = trace.get_current_span()
    for key, value in attributes.items():
        current.set_attribute(f"facegrid.{key}", value)


def trace_headers() -> dict[str, str]:
    """W3C trace context of the current span, for an outgoing request's headers."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return carrier


def current_trace_id() -> str:
    """The current trace id (32 lowercase hex digits), or "" outside a sampled trace."""
    context = trace.get_current_span().get_span_context()
    return format(context.trace_id, "032x") if context.is_valid else ""


def grpc_server_interceptor() -> grpc.aio.ServerInterceptor:
    """OpenTelemetry's gRPC server interceptor: a span per call, context from metadata.

    Health checks and reflection are left out: probes every few seconds are noise, and
    the health Watch stream writes through its context, which the interceptor does not
    wrap.
    """
    untraced = filters.any_of(filters.health_check(), filters.service_prefix("grpc.reflection"))
    return aio_server_interceptor(filter_=filters.negate(untraced))  # type: ignore[no-untyped-call]


def grpc_client_interceptors() -> list[grpc.aio.ClientInterceptor]:
    """OpenTelemetry's gRPC client interceptors: a span per call, context into metadata."""
    return list(aio_client_interceptors())  # type: ignore[no-untyped-call]
