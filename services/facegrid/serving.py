"""Running one service in this process: what `facegrid serve NAME` does."""

from __future__ import annotations

import asyncio
import importlib
import logging

from facegrid import diagnostics
from facegrid.config import load_settings
from facegrid.logs import configure_logging
from facegrid.metrics import serve_metrics
from facegrid.telemetry import setup_tracing, shutdown_tracing

# service name -> module whose ``serve(settings)`` coroutine runs it until stopped.
SERVICES = {
    "detection": "facegrid_detection.app",
    "embedding": "facegrid_embedding.app",
    "search": "facegrid_search.app",
    "gateway": "facegrid_gateway.app",
    "ingest": "facegrid_ingest.app",
    "console": "facegrid_console.app",
}


def serve_one(service: str, overrides: list[str]) -> int:
    """Run one service in this process until SIGTERM/SIGINT; 0 after a clean stop."""
    diagnostics.install_early()
    settings = load_settings(overrides)
    configure_logging(service, settings.server.log_level, settings.server.log_format)
    logging.getLogger("grpc._server").addFilter(_not_milvus_lite_probe)
    provider = setup_tracing(service)
    serve_metrics(settings.server.host, getattr(settings, service).metrics_port)
    module = importlib.import_module(SERVICES[service])
    try:
        asyncio.run(module.serve(settings))
    finally:
        shutdown_tracing(provider)
    return 0


def _not_milvus_lite_probe(record: logging.LogRecord) -> bool:
    """Drop the traceback Milvus Lite's in-process server logs for every call of a method
    it lacks (pymilvus probes AllocTimestamp and falls back); our servers are grpc.aio."""
    error = record.exc_info[1] if record.exc_info else None
    return not (isinstance(error, NotImplementedError) and "not implemented" in str(error))
