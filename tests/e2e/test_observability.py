"""Traces, metrics and logs of the four services as processes, with inference on Triton.

An OTLP/gRPC receiver runs in this test process (the services export to it through the
standard OTEL_* variables) and an OTLP/HTTP one receives Triton's own traces; one
SearchFacesByImage must be one trace across gateway, detection, embedding, search and
Triton, correctly parented, without personal data.
"""

from __future__ import annotations

import http.server
import json
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
import pytest
from conftest import TRITON_VENV, inference_overrides
from facegrid.auth import ALL_SCOPES, create_token
from facegrid.v1 import common_pb2, face_service_pb2, face_service_pb2_grpc
from facegrid_harness.launcher import FACE_SERVICES, ServiceGroup
from facegrid_harness.processes import free_port
from facegrid_harness.triton_server import TritonInstall, TritonServer
from grpc_helpers import jpeg_bytes, png_bytes, rpc_error
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.trace.v1 import trace_pb2
from prometheus_client.parser import text_string_to_metric_families
from skimage import data

F = face_service_pb2
Purpose = common_pb2.IdentificationContext.Purpose
DEADLINE_S = 60.0
CASE_ID = "CASE-TRACE-7c1e"
JUSTIFICATION = "a justification that must stay out of telemetry"
SERVICES = {f"facegrid-{name}" for name in FACE_SERVICES}
SERVER = trace_pb2.Span.SpanKind.SPAN_KIND_SERVER
CLIENT = trace_pb2.Span.SpanKind.SPAN_KIND_CLIENT
# Photos that ship with scikit-image, so that this runs without ../shared/data/faces:
# the astronaut enrolled, her mirror image searched.
ENROLLED = png_bytes(data.astronaut())
PROBE = jpeg_bytes(np.ascontiguousarray(data.astronaut()[:, ::-1]))


@dataclass
class ReceivedSpan:
    service: str
    span: trace_pb2.Span


class OtlpReceiver(trace_service_pb2_grpc.TraceServiceServicer):  # type: ignore[misc]
    """The services' exporter target: keeps every span it is sent."""

    def __init__(self) -> None:
        self.spans: list[ReceivedSpan] = []
        self.lock = threading.Lock()

    def Export(  # noqa: N802
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: object
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        with self.lock:
            for resource_spans in request.resource_spans:
                attributes = {a.key: a.value for a in resource_spans.resource.attributes}
                service = attributes["service.name"].string_value
                for scope in resource_spans.scope_spans:
                    self.spans += [ReceivedSpan(service, s) for s in scope.spans]
        return trace_service_pb2.ExportTraceServiceResponse()

    def of_trace(self, trace_id: str) -> list[ReceivedSpan]:
        with self.lock:
            return [s for s in self.spans if s.span.trace_id.hex() == trace_id]


@dataclass
class TritonSpans:
    """Triton's own spans (it exports OTLP/HTTP with JSON bodies), and any body not understood."""

    spans: list[dict[str, str]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    posts: int = 0

    def of_trace(self, trace_id: str) -> list[dict[str, str]]:
        return [s for s in list(self.spans) if s["traceId"] == trace_id]


@dataclass
class TracedStack:
    group: ServiceGroup
    address: str
    token: str
    receiver: OtlpReceiver
    triton_spans: TritonSpans
    log_dir: Path
    triton_log: Callable[[], str]


@pytest.fixture(scope="module")
def stack(model_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TracedStack]:
    work = tmp_path_factory.mktemp("observability")
    receiver = OtlpReceiver()
    otlp = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(receiver, otlp)
    otlp_port = otlp.add_insecure_port("127.0.0.1:0")
    otlp.start()
    triton_spans = TritonSpans()
    http_receiver = _triton_receiver(triton_spans)
    triton = TritonServer(
        TritonInstall.discover(TRITON_VENV),
        model_repo,
        work / "triton",
        trace_url=f"http://127.0.0.1:{http_receiver.server_port}/v1/traces",
    )
    credentials = work / "credentials.json"
    token = create_token(credentials, "observer", ALL_SCOPES)
    env = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{otlp_port}",
        "OTEL_EXPORTER_OTLP_INSECURE": "true",
        "OTEL_BSP_SCHEDULE_DELAY": "200",
    }
    with triton:
        group = ServiceGroup(
            [
                *inference_overrides("triton", model_repo, triton),
                f"store.uri={work / 'facegrid.db'}",
                f"gateway.credentials_file={credentials}",
                f"gateway.audit_path={work / 'audit.db'}",
            ],
            log_dir=work / "logs",
            env=env,
        )
        try:
            for name in FACE_SERVICES:
                group.start(name, port=0)
            yield TracedStack(
                group,
                group.services["gateway"].address,
                token,
                receiver,
                triton_spans,
                work / "logs",
                triton.log_tail,
            )
        finally:
            group.stop()
    http_receiver.shutdown()
    otlp.stop(None)


def _triton_receiver(sink: TritonSpans) -> http.server.ThreadingHTTPServer:
    class Handler(http.server.BaseHTTPRequestHandler):
        # HTTP/1.1 with keep-alive, as Triton's OTLP exporter (libcurl) expects: under
        # HTTP/1.0 the server closes each connection, and an export that reuses one
        # before curl notices is lost without a retry.
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:
            sink.posts += 1
            raw = self.rfile.read(int(self.headers.get("content-length") or 0))
            try:
                body = json.loads(raw)
            except ValueError as error:
                sink.errors.append(f"{self.headers.get('content-type')}: {error}: {raw[:200]!r}")
                body = {}
            for resource in body.get("resourceSpans", []):
                for scope in resource.get("scopeSpans", []):
                    sink.spans.extend(scope.get("spans", []))
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", "2")
            self.end_headers()
            self.wfile.write(b"{}")

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@pytest.fixture(scope="module")
def api(stack: TracedStack) -> Iterator[face_service_pb2_grpc.FaceServiceStub]:
    with grpc.insecure_channel(stack.address) as channel:
        yield face_service_pb2_grpc.FaceServiceStub(channel)


def _metadata(stack: TracedStack, traceparent: str | None = None) -> list[tuple[str, str]]:
    metadata = [("authorization", f"Bearer {stack.token}")]
    if traceparent:
        metadata.append(("traceparent", traceparent))
    return metadata


CONTEXT = common_pb2.IdentificationContext(
    purpose=Purpose.PURPOSE_TESTING, case_id=CASE_ID, justification=JUSTIFICATION
)


@pytest.fixture(scope="module")
def traced_search(
    stack: TracedStack, api: face_service_pb2_grpc.FaceServiceStub
) -> tuple[str, str, F.SearchFacesByImageResponse]:
    """One SearchFacesByImage inside a trace the test started: (trace id, parent id, reply)."""
    api.CreateCollection(
        F.CreateCollectionRequest(collection_id="traced"),
        timeout=DEADLINE_S,
        metadata=_metadata(stack),
    )
    api.IndexFaces(
        F.IndexFacesRequest(
            parent="collections/traced",
            image=ENROLLED,
            subject_id="",
        ),
        timeout=DEADLINE_S,
        metadata=_metadata(stack),
    )
    trace_id, parent_id = uuid.uuid4().hex, uuid.uuid4().hex[:16]
    reply = api.SearchFacesByImage(
        F.SearchFacesByImageRequest(
            parent="collections/traced",
            image=PROBE,
            context=CONTEXT,
        ),
        timeout=DEADLINE_S,
        metadata=_metadata(stack, f"00-{trace_id}-{parent_id}-01"),
    )
    return trace_id, parent_id, reply


def _wait_for(condition: Callable[[], bool], timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.2)


def test_one_search_is_one_trace_across_every_service_and_triton(
    stack: TracedStack, traced_search: tuple[str, str, F.SearchFacesByImageResponse]
) -> None:
    trace_id, parent_id, reply = traced_search
    assert reply.face_matches

    def triton_requests_in(count: int) -> Callable[[], bool]:
        def arrived() -> bool:
            services = {s.service for s in stack.receiver.of_trace(trace_id)}
            requests = stack.triton_spans.of_trace(trace_id)
            return (
                services >= SERVICES and sum(s["name"] == "InferRequest" for s in requests) >= count
            )

        return arrived

    # Every service's spans and one of Triton's; then both of Triton's if they come soon
    # (a late batch of Triton's came after a minute or never: no use waiting that long).
    _wait_for(triton_requests_in(1), timeout_s=60.0)
    _wait_for(triton_requests_in(2), timeout_s=10.0)
    spans = stack.receiver.of_trace(trace_id)
    assert {s.service for s in spans} >= SERVICES, {s.service for s in spans}
    by_id = {s.span.span_id.hex(): s for s in spans}

    # The gateway's server span continues the caller's trace.
    (root,) = [
        s
        for s in spans
        if s.service == "facegrid-gateway"
        and s.span.kind == SERVER
        and s.span.name.endswith("/SearchFacesByImage")
    ]
    assert root.span.parent_span_id.hex() == parent_id

    # Each service's server span is the child of a gateway client span under the root.
    for service, method in (
        ("facegrid-detection", "DetectFaces"),
        ("facegrid-embedding", "EmbedChips"),
        ("facegrid-search", "SearchFaces"),
    ):
        servers = [
            s
            for s in spans
            if s.service == service and s.span.kind == SERVER and s.span.name.endswith(method)
        ]
        assert servers, f"no {method} server span from {service}"
        for server in servers:
            caller = by_id[server.span.parent_span_id.hex()]
            assert caller.service == "facegrid-gateway"
            assert caller.span.kind == CLIENT
            assert _ancestors(caller, by_id)[-1] is root

    # Inference spans, and Triton's own spans beneath them.
    inference = {s.span.span_id.hex(): s for s in spans if s.span.name.startswith("inference ")}
    assert {s.service for s in inference.values()} == {
        "facegrid-detection",
        "facegrid-embedding",
    }
    triton_requests = [
        s for s in stack.triton_spans.of_trace(trace_id) if s["name"] == "InferRequest"
    ]
    # Triton exports its spans on its own schedule; on a loaded machine one batch may come
    # late, so one request suffices to show that Triton joined the trace where it should.
    assert triton_requests, (
        f"{stack.triton_spans.posts} exports from Triton, {len(stack.triton_spans.spans)} spans,"
        f" none of trace {trace_id}; errors: {stack.triton_spans.errors};"
        f" Triton's log:\n{stack.triton_log()}"
    )
    assert {s["parentSpanId"] for s in triton_requests} <= set(inference)

    # Useful attributes, and nothing personal.
    attributes = {
        a.key: a.value for s in spans for a in s.span.attributes if a.key.startswith("facegrid.")
    }
    assert attributes["facegrid.collection"].string_value == "collections/traced"
    assert attributes["facegrid.top_similarity"].double_value == pytest.approx(
        reply.face_matches[0].similarity, abs=1e-3
    )
    assert "facegrid.batch_size" in attributes
    assert "facegrid.model" in attributes
    for received in spans:
        for attribute in received.span.attributes:
            value = attribute.value
            assert not value.HasField("bytes_value"), attribute.key
            assert not value.HasField("array_value"), attribute.key
            text = value.string_value
            assert CASE_ID not in text
            assert JUSTIFICATION not in text
            assert stack.token not in text
            assert len(text) < 300, attribute.key


def _ancestors(span: ReceivedSpan, by_id: dict[str, ReceivedSpan]) -> list[ReceivedSpan]:
    chain = [span]
    while chain[-1].span.parent_span_id.hex() in by_id:
        chain.append(by_id[chain[-1].span.parent_span_id.hex()])
    return chain


def test_the_audit_record_names_the_trace(
    stack: TracedStack,
    api: face_service_pb2_grpc.FaceServiceStub,
    traced_search: tuple[str, str, F.SearchFacesByImageResponse],
) -> None:
    trace_id, _, reply = traced_search
    record = api.GetAuditRecord(
        F.GetAuditRecordRequest(name=reply.audit_record),
        timeout=DEADLINE_S,
        metadata=_metadata(stack),
    ).audit_record
    assert record.trace_id == trace_id


# ---------------------------------------------------------------- metrics


def _scrape(
    stack: TracedStack, service: str
) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    port = stack.group.services[service].metrics_port
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def _value(
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str
) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_metrics_count_what_was_sent(
    stack: TracedStack, api: face_service_pb2_grpc.FaceServiceStub
) -> None:
    metadata = _metadata(stack)
    api.CreateCollection(
        F.CreateCollectionRequest(collection_id="metrics"), timeout=DEADLINE_S, metadata=metadata
    )
    indexed = api.IndexFaces(
        F.IndexFacesRequest(parent="collections/metrics", image=ENROLLED),
        timeout=DEADLINE_S,
        metadata=metadata,
    )
    before = {name: _scrape(stack, name) for name in FACE_SERVICES}
    image = PROBE
    search = F.SearchFacesByImageRequest(parent="collections/metrics", image=image, context=CONTEXT)
    for _ in range(3):
        api.SearchFacesByImage(search, timeout=DEADLINE_S, metadata=metadata)
    no_context = F.SearchFacesByImageRequest(parent="collections/metrics", image=image)
    for _ in range(2):
        rpc_error(lambda: api.SearchFacesByImage(no_context, timeout=DEADLINE_S, metadata=metadata))
    missing = F.SearchFacesRequest(
        face=f"collections/metrics/faces/{uuid.uuid4()}", context=CONTEXT
    )
    rpc_error(lambda: api.SearchFaces(missing, timeout=DEADLINE_S, metadata=metadata))
    after = {name: _scrape(stack, name) for name in FACE_SERVICES}
    for name in FACE_SERVICES:  # no secret or personal data in any label
        text = repr(after[name])
        assert stack.token not in text
        assert JUSTIFICATION not in text
        assert CASE_ID not in text

    def delta(process: str, name: str, **labels: str) -> float:
        return _value(after[process], name, **labels) - _value(before[process], name, **labels)

    gateway = "/facegrid.v1.FaceService/SearchFacesByImage"
    requests = "facegrid_rpc_requests_total"
    expected = [  # (process, metric, method, code, change)
        ("gateway", requests, gateway, "OK", 3),
        ("gateway", requests, gateway, "INVALID_ARGUMENT", 2),
        ("gateway", "facegrid_rpc_errors_total", gateway, "INVALID_ARGUMENT", 2),
        ("gateway", requests, "/facegrid.v1.FaceService/SearchFaces", "NOT_FOUND", 1),
        ("detection", requests, "/facegrid.internal.v1.DetectionService/DetectFaces", "OK", 3),
        ("embedding", requests, "/facegrid.internal.v1.EmbeddingService/EmbedChips", "OK", 3),
        ("search", requests, "/facegrid.internal.v1.SearchService/SearchFaces", "OK", 3),
        ("search", requests, "/facegrid.internal.v1.SearchService/GetFace", "NOT_FOUND", 1),
    ]
    for process, metric, method, code, change in expected:
        got = delta(process, metric, service=process, method=method, code=code)
        assert got == change, (process, metric, method, code)
    latency = "facegrid_rpc_duration_seconds_count"
    assert delta("gateway", latency, service="gateway", method=gateway) == 5
    # Inference: one call per image for the detector; the embedder sees each chip twice,
    # as it is and mirrored (embedding.mirror_average).
    assert (
        delta(
            "detection",
            "facegrid_inference_duration_seconds_count",
            model="face_detector",
            backend="triton",
        )
        == 3
    )
    assert (
        delta(
            "embedding",
            "facegrid_inference_batch_size_sum",
            model="face_embedder",
            backend="triton",
        )
        == 6
    )
    assert _value(after["search"], "facegrid_gallery_faces", collection="metrics") == len(
        indexed.face_records
    )
    assert _value(after["embedding"], "facegrid_queue_depth", queue="embedding_chips") == 0
    audited = _value(after["gateway"], "facegrid_audit_records_total", method=gateway, code="OK")
    assert audited >= 3


# ---------------------------------------------------------------- logs


def test_logs_are_json_lines_with_trace_ids_and_no_personal_data(
    stack: TracedStack, traced_search: tuple[str, str, F.SearchFacesByImageResponse]
) -> None:
    trace_id, _, _ = traced_search
    time.sleep(0.5)
    lines: dict[str, list[dict[str, object]]] = {}
    for name in FACE_SERVICES:
        text = (stack.log_dir / f"{name}.log").read_text()
        assert CASE_ID not in text
        assert JUSTIFICATION not in text
        assert stack.token not in text
        parsed = []
        for line in text.splitlines():
            try:
                parsed.append(json.loads(line))
            except json.JSONDecodeError:
                pytest.fail(f"{name}: not a JSON line: {line[:200]}")
        lines[name] = parsed
    for name, method in (
        ("gateway", "/facegrid.v1.FaceService/SearchFacesByImage"),
        ("detection", "/facegrid.internal.v1.DetectionService/DetectFaces"),
        ("embedding", "/facegrid.internal.v1.EmbeddingService/EmbedChips"),
        ("search", "/facegrid.internal.v1.SearchService/SearchFaces"),
    ):
        calls = [
            line
            for line in lines[name]
            if line.get("message") == "rpc"
            and line.get("trace_id") == trace_id
            and line.get("rpc.method") == method
        ]
        assert len(calls) == 1, (name, calls)
        (call,) = calls
        assert call["rpc.code"] == "OK"
        assert isinstance(call["duration_ms"], int | float)
        assert call["service"] == name
        assert len(str(call["span_id"])) == 16
