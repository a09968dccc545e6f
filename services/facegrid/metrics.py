"""Prometheus metrics: one place that names them, shared by every service.

Each service serves them over HTTP on its ``metrics_port`` (``/metrics``). Labels hold
method names, status codes, model names and collection ids only: never personal data.
"""

from __future__ import annotations

import logging

from prometheus_client import Counter, Gauge, Histogram, start_http_server

log = logging.getLogger(__name__)

_LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)  # fmt: skip
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)

RPC_REQUESTS = Counter(
    "facegrid_rpc_requests",
    "gRPC calls served, by method and status code.",
    ["service", "method", "code"],
)
RPC_ERRORS = Counter(
    "facegrid_rpc_errors",
    "gRPC calls that ended with a status other than OK, by method and code.",
    ["service", "method", "code"],
)
RPC_LATENCY = Histogram(
    "facegrid_rpc_duration_seconds",
    "Time to serve a gRPC call, by method.",
    ["service", "method"],
    buckets=_LATENCY_BUCKETS,
)
RPC_IN_FLIGHT = Gauge(
    "facegrid_rpc_in_flight",
    "gRPC calls being served now, by method (streams count while open); what the "
    "gateway's and ingest's autoscalers can follow (k8s/components/custom-metrics).",
    ["service", "method"],
)
INFERENCE_LATENCY = Histogram(
    "facegrid_inference_duration_seconds",
    "Time of one model inference call, by model and backend.",
    ["model", "backend"],
    buckets=_LATENCY_BUCKETS,
)
INFERENCE_BATCH = Histogram(
    "facegrid_inference_batch_size",
    "Items (images or chips) per model inference call.",
    ["model", "backend"],
    buckets=_BATCH_BUCKETS,
)
QUEUE_DEPTH = Gauge(
    "facegrid_queue_depth",
    "Items waiting in a bounded queue.",
    ["queue"],
)
GALLERY_FACES = Gauge(
    "facegrid_gallery_faces",
    "Faces stored per collection.",
    ["collection"],
)
AUDIT_RECORDS = Counter(
    "facegrid_audit_records",
    "Audit records written, by method and status code.",
    ["method", "code"],
)

# The ingest service, per source (processor and source ids, never people).
INGEST_FRAMES = Counter(
    "facegrid_ingest_frames",
    "Frames of a video source: received, sampled, dropped (pipeline behind), rejected.",
    ["processor", "source", "outcome"],
)
INGEST_DETECTIONS = Counter(
    "facegrid_ingest_frame_detections",
    "Processed frames by how faces were looked for: full (whole frame), regions (around "
    "live tracks) or skipped (nothing to look for between full-frame detections).",
    ["processor", "source", "kind"],
)
INGEST_RECONNECTS = Counter(
    "facegrid_ingest_reconnects", "Reconnections of a pull source.", ["processor", "source"]
)
INGEST_TRACKS = Counter("facegrid_ingest_tracks", "Face tracks begun.", ["processor", "source"])
INGEST_EVENTS = Counter("facegrid_ingest_events", "Match events stored.", ["processor", "source"])
INGEST_SUPPRESSED = Counter(
    "facegrid_ingest_suppressed_repeats",
    "Repeat matches within the suppression window that made no event.",
    ["processor", "source"],
)
INGEST_LEASE_OWNER = Gauge(
    "facegrid_ingest_lease_owner",
    "1 while this replica holds the source's lease.",
    ["processor", "source"],
)
INGEST_LEASES_LOST = Counter(
    "facegrid_ingest_leases_lost", "Source leases this replica lost without handing over."
)
INGEST_EVENT_LATENCY = Histogram(
    "facegrid_ingest_capture_to_event_seconds",
    "From the capture of an event's best shot to the event being stored.",
    buckets=_LATENCY_BUCKETS,
)
INGEST_BATCH_FRAMES = Histogram(
    "facegrid_ingest_batch_frames", "Sampled frames per batch.", buckets=_BATCH_BUCKETS
)
INGEST_CONSUMER_LAG = Gauge(
    "facegrid_ingest_consumer_lag",
    "Events stored but not yet sent to a subscriber, summed over open subscriptions.",
)

CONSOLE_REQUESTS = Counter(
    "facegrid_console_requests",
    "Console HTTP requests answered, by page (the path's first segment) and status.",
    ["page", "method", "status"],
)
CONSOLE_LATENCY = Histogram(
    "facegrid_console_request_duration_seconds",
    "Time to answer a console HTTP request (a live alert view: while open), by page.",
    ["page", "method"],
    buckets=_LATENCY_BUCKETS,
)


def serve_metrics(host: str, port: int) -> int:
    """Serve /metrics on ``host:port`` in a background thread (0: off); return the port."""
    if port == 0:
        return 0
    try:
        server, _ = start_http_server(port, addr=host)
    except OSError as error:
        raise RuntimeError(
            f"cannot serve metrics on {host}:{port} ({error.strerror}): set the service's "
            "metrics_port to a free port, or 0 to turn metrics off"
        ) from error
    bound = int(server.server_port)
    log.info("metrics on http://%s:%d/metrics", host, bound)
    return bound
