"""Every service's server builds in this process around a servicer given its dependencies
(here, none that a health check reaches), serves health and reflection, and stops."""

from __future__ import annotations

import importlib
from typing import Any

import grpc
import pytest
from facegrid.config import load_settings
from facegrid.serving import SERVICES
from fakes import ServerThread, serving
from grpc_helpers import is_serving, reflected_services

# The servicer class of each service and its full gRPC name.
SERVICERS = {
    "detection": ("DetectionServicer", "facegrid.internal.v1.DetectionService"),
    "embedding": ("EmbeddingServicer", "facegrid.internal.v1.EmbeddingService"),
    "search": ("SearchServicer", "facegrid.internal.v1.SearchService"),
    "gateway": ("FaceServicer", "facegrid.v1.FaceService"),
    "ingest": ("IngestServicer", "facegrid.v1.IngestService"),
}


def servicer_without_dependencies(module: Any, class_name: str) -> Any:
    """The servicer object, its constructor skipped: health and reflection never call it."""
    cls = getattr(module, class_name)
    return cls.__new__(cls)


# The console is a web server, not a gRPC one (tests/unit/test_console_policy.py, and in a real
# browser tests/e2e/test_console.py).
WEB_SERVICES = {"console"}


def test_every_service_is_listed() -> None:
    assert set(SERVICERS) == set(SERVICES) - WEB_SERVICES


@pytest.mark.parametrize("service", sorted(SERVICERS))
def test_a_service_server_builds_in_process(service: str) -> None:
    module = importlib.import_module(SERVICES[service])
    class_name, full_name = SERVICERS[service]
    servicer = servicer_without_dependencies(module, class_name)
    settings = load_settings()
    thread = ServerThread()
    try:
        build = lambda: module.build_server(settings, servicer, port=0)  # noqa: E731
        with serving(thread, build) as address, grpc.insecure_channel(address) as channel:
            assert is_serving(channel, full_name)
            assert full_name in reflected_services(channel)
    finally:
        thread.close()
