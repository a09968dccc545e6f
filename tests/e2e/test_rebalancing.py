"""Replicas behind one DNS name: one added under load takes its share within seconds, one
removed (SIGTERM) fails no call.

Real parts: gateway replicas as processes, each on its own loopback address
(127.0.0.2, .3, .4) and the same port, a real DNS server on 127.0.0.1 (dnslib, TTL 1 s)
that answers the name with the live replicas' addresses, and a gRPC client that
resolves the name through it (``dns://127.0.0.1:PORT/name:port``) with round-robin
and client-side health checks, as the gateway's own channels and the facegrid client
are configured. What moves calls to a new replica is the servers' maximum connection
age (server.max_connection_age_s): each connection is told to go away after it, the
client re-resolves the name and connects to every address it now has.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from facegrid.auth import ALL_SCOPES, bearer_metadata, create_token
from facegrid.v1 import face_service_pb2, face_service_pb2_grpc
from facegrid_harness.launcher import RunningService, ServiceGroup
from facegrid_harness.processes import free_port

from tests.e2e.dns_server import DnsServer, addresses_bind

NAME = "gateway.facegrid.test"
ALIASES = ("127.0.0.2", "127.0.0.3", "127.0.0.4")


pytestmark = pytest.mark.skipif(
    not addresses_bind(*ALIASES), reason="loopback aliases 127.0.0.2-4 do not bind"
)


@pytest.fixture
def dns() -> Iterator[DnsServer]:
    with DnsServer() as server:
        yield server


def _served(service: RunningService, host: str) -> float:
    """ListAuditRecords calls this replica has served, from its own /metrics."""
    url = f"http://{host}:{service.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith("facegrid_rpc_requests_total{") and 'ListAuditRecords"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_a_replica_added_under_load_takes_its_share_and_one_removed_fails_no_call(
    dns: DnsServer, tmp_path: Path
) -> None:
    credentials = tmp_path / "credentials.json"
    token = create_token(credentials, "load", ALL_SCOPES)
    port = free_port()
    group = ServiceGroup(
        [
            f"gateway.credentials_file={credentials}",
            f"gateway.audit_path={tmp_path / 'audit.db'}",
            "server.max_connection_age_s=2",
            "server.drain_s=1.5",
        ],
        log_dir=tmp_path / "logs",
    )
    replicas: dict[str, RunningService] = {}
    calls: list[tuple[float, str]] = []  # (time, "ok" or the status code)
    stop = threading.Event()
    try:
        for index, host in enumerate(ALIASES[:2]):
            replicas[host] = group.start(
                "gateway", port=port, instance=f"gateway-{index}", host=host
            )
        dns.set(NAME, list(ALIASES[:2]))
        config = json.dumps(
            {
                "loadBalancingConfig": [{"round_robin": {}}],
                "healthCheckConfig": {"serviceName": ""},
                "methodConfig": [
                    {
                        "name": [{"service": "facegrid.v1.FaceService"}],
                        "retryPolicy": {
                            "maxAttempts": 4,
                            "initialBackoff": "0.05s",
                            "maxBackoff": "0.5s",
                            "backoffMultiplier": 2,
                            "retryableStatusCodes": ["UNAVAILABLE"],
                        },
                    }
                ],
            }
        )
        channel = grpc.insecure_channel(
            dns.target(NAME, port),
            options=[
                ("grpc.service_config", config),
                ("grpc.enable_retries", 1),
                ("grpc.dns_min_time_between_resolutions_ms", 500),
            ],
        )
        stub = face_service_pb2_grpc.FaceServiceStub(channel)
        metadata = bearer_metadata(token)
        request = face_service_pb2.ListAuditRecordsRequest(page_size=1)

        def load() -> None:
            while not stop.is_set():
                try:
                    stub.ListAuditRecords(request, metadata=metadata, timeout=10)
                    calls.append((time.monotonic(), "ok"))
                except grpc.RpcError as error:
                    calls.append((time.monotonic(), str(error.code())))
                time.sleep(0.02)

        worker = threading.Thread(target=load)
        worker.start()
        time.sleep(3.0)
        assert calls, "no call went through"

        # A third replica joins the name under load.
        third = ALIASES[2]
        replicas[third] = group.start("gateway", port=port, instance="gateway-2", host=third)
        dns.set(NAME, list(ALIASES))
        before = {host: _served(service, host) for host, service in replicas.items()}
        time.sleep(10.0)
        after = {host: _served(service, host) for host, service in replicas.items()}
        shares = {host: after[host] - before[host] for host in replicas}
        total = sum(shares.values())
        assert total > 50, shares
        print(f"calls served in the 10 s after the third replica joined: {shares}")
        assert shares[third] / total >= 0.2, shares

        # One leaves: out of the name first, then SIGTERM (it drains, then stops).
        leaving = ALIASES[0]
        dns.set(NAME, [a for a in ALIASES if a != leaving])
        time.sleep(1.0)
        removed = group.services.pop("gateway-0")
        removed.process.terminate()
        assert removed.process.wait(30) == 0
        time.sleep(4.0)
        stop.set()
        worker.join(30)
        channel.close()
    finally:
        stop.set()
        group.stop()
    failures = [outcome for _, outcome in calls if outcome != "ok"]
    print(f"{len(calls)} calls, {len(failures)} failed")
    assert not failures, f"{len(failures)} of {len(calls)} calls failed: {set(failures)}"
    assert len(calls) > 200
