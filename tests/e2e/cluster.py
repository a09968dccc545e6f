"""A cluster on one machine: two replicas of every service behind one DNS name each.

What a Kubernetes deployment looks like to facegrid's own code, with real parts only:
detection, embedding, search (on a real Milvus server), the gateway and ingest, two
replicas each, every replica on its own loopback address (127.0.0.2 and 127.0.0.3) and
its kind's one port, behind a name served by a real DNS server (``detection.facegrid.test``
and so on); the gateway and ingest reach the internal services through those names
(round-robin, health-checked, re-resolved as connections age), the audit log of both is
one chain in a real PostgreSQL server, ingest's state is in a real nats-server.

``Cluster.restart(kind, host)`` takes a replica out of its name, stops it with SIGTERM
(it drains), starts it again on the same address and puts it back: a rolling update.
``Cluster.kill(kind, host)`` kills one with SIGKILL and replaces it.
"""

from __future__ import annotations

import contextlib
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from facegrid.auth import ALL_SCOPES, bearer_metadata, create_token
from facegrid.v1 import face_service_pb2, face_service_pb2_grpc
from facegrid_harness.launcher import RunningService, ServiceGroup
from facegrid_harness.nats_server import NatsServer
from facegrid_harness.processes import free_ports

from tests.e2e.dns_server import DnsServer
from tests.e2e.postgres_server import PostgresServer

HOSTS = ("127.0.0.2", "127.0.0.3")
DOMAIN = "facegrid.test"
KINDS = ("detection", "embedding", "search", "gateway", "ingest")
CALLED = {"detection": "detection_address", "embedding": "embedding_address"}
CALLED["search"] = "search_address"
# Out of the name this long before SIGTERM: clients re-resolve within a second.
LEAVE_S = 1.5
# After a replica is back: time for clients to reconnect to it before the next goes.
SETTLE_S = 2.0


@dataclass
class Cluster:
    group: ServiceGroup
    dns: DnsServer
    ports: dict[str, int]
    token: str
    audit_url: str
    replicas: dict[str, list[str]] = field(default_factory=dict)  # kind -> live hosts

    def name(self, kind: str) -> str:
        return f"{kind}.{DOMAIN}"

    def target(self, kind: str) -> str:
        return self.dns.target(self.name(kind), self.ports[kind])

    def metadata(self) -> tuple[tuple[str, str]]:
        return bearer_metadata(self.token)

    def service(self, kind: str, host: str) -> RunningService:
        return self.group.services[f"{kind}@{host}"]

    def _publish(self, kind: str) -> None:
        self.dns.set(self.name(kind), self.replicas[kind])

    def start(self, kind: str, host: str, extra: list[str]) -> None:
        self.group.start(
            kind, port=self.ports[kind], instance=f"{kind}@{host}", host=host, extra=extra
        )
        self.replicas.setdefault(kind, [])
        if host not in self.replicas[kind]:
            self.replicas[kind].append(host)
        self._publish(kind)

    def restart(self, kind: str, host: str) -> None:
        """A rolling update of one replica (ServiceGroup.restart raises unless it exits 0
        on SIGTERM and comes back healthy)."""
        self.replicas[kind].remove(host)
        self._publish(kind)
        time.sleep(LEAVE_S)
        self.group.restart(f"{kind}@{host}")
        self.replicas[kind].append(host)
        self._publish(kind)
        time.sleep(SETTLE_S)  # clients reconnect before the next one goes (minReadySeconds)

    def kill(self, kind: str, host: str, dead_s: float = 5.0) -> None:
        """SIGKILL one replica, leave it dead but still in its name for ``dead_s`` (as
        until a readiness probe fails), then take it out and start a new one there."""
        name = f"{kind}@{host}"
        service = self.group.services[name]
        service.process.send_signal(signal.SIGKILL)
        service.process.wait(10)
        time.sleep(dead_s)
        self.replicas[kind].remove(host)
        self._publish(kind)
        del self.group.services[name]
        self.start(kind, host, list(service.extra))


def all_audit_records(
    api: face_service_pb2_grpc.FaceServiceStub, metadata: tuple[tuple[str, str]]
) -> list[face_service_pb2.AuditRecord]:
    """Every audit record, in log order, read through the gateway page by page."""
    records: list[face_service_pb2.AuditRecord] = []
    token = ""
    while True:
        page = api.ListAuditRecords(
            face_service_pb2.ListAuditRecordsRequest(page_size=1000, page_token=token),
            metadata=metadata,
            timeout=120,
        )
        records.extend(page.audit_records)
        token = page.next_page_token
        if not token:
            return records


def _dependencies(kind: str, dns: DnsServer, ports: dict[str, int]) -> list[str]:
    if kind not in ("gateway", "ingest"):
        return []
    return [
        f"{kind}.{setting}={dns.target(f'{dependency}.{DOMAIN}', ports[dependency])}"
        for dependency, setting in CALLED.items()
    ]


@contextlib.contextmanager
def running_cluster(work: Path, milvus_uri: str, model_overrides: list[str]) -> Iterator[Cluster]:
    """Everything started (two replicas of each kind); everything stopped afterwards."""
    credentials = work / "credentials.json"
    token = create_token(credentials, "cluster-operator", ALL_SCOPES)
    ports = dict(zip(KINDS, free_ports(len(KINDS)), strict=True))
    with DnsServer() as dns, PostgresServer() as postgres, NatsServer(work / "nats") as nats:
        group = ServiceGroup(
            [
                *model_overrides,
                f"store.uri={milvus_uri}",
                f"gateway.credentials_file={credentials}",
                f"gateway.audit_database_url={postgres.url}",
                f"gateway.audit_signing_key_file={work / 'audit-signing.key'}",
                f"ingest.nats_url={nats.url}",
                "server.max_connection_age_s=2",
                "server.drain_s=1",
            ],
            log_dir=work / "logs",
        )
        cluster = Cluster(group, dns, ports, token, postgres.url)
        try:
            for kind in KINDS:
                for index, host in enumerate(HOSTS):
                    extra = _dependencies(kind, dns, ports)
                    if kind == "ingest":
                        extra.append(f"ingest.replica_id=ingest-{index}")
                    cluster.start(kind, host, extra)
            yield cluster
        finally:
            group.stop()
