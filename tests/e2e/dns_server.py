"""A real DNS server on 127.0.0.1 for tests of replicas behind one name (dnslib, UDP).

Names map to lists of IPv4 addresses that the test changes as replicas come and go;
answers carry a TTL of 1 s. gRPC clients use it through the target
``dns://127.0.0.1:PORT/NAME:SERVICE_PORT`` (c-ares takes the DNS server from the URI's
authority).
"""

from __future__ import annotations

import socket
import threading
from types import TracebackType

from dnslib import QTYPE, RR, A
from dnslib.server import BaseResolver, DNSLogger, DNSServer
from facegrid_harness.processes import free_port


def addresses_bind(*addresses: str) -> bool:
    """Whether every address can be bound here (loopback aliases 127.0.0.2 and up)."""
    for address in addresses:
        with socket.socket() as probe:
            try:
                probe.bind((address, 0))
            except OSError:
                return False
    return True


class _Resolver(BaseResolver):  # type: ignore[misc]
    def __init__(self) -> None:
        self.names: dict[str, list[str]] = {}
        self.lock = threading.Lock()

    def resolve(self, request: object, handler: object) -> object:
        reply = request.reply()  # type: ignore[attr-defined]
        question = request.q  # type: ignore[attr-defined]
        name = str(question.qname).rstrip(".")
        if question.qtype == QTYPE.A:
            with self.lock:
                addresses = list(self.names.get(name, []))
            for address in addresses:
                reply.add_answer(RR(question.qname, QTYPE.A, rdata=A(address), ttl=1))
        return reply


class DnsServer:
    """Use as a context manager; ``set(name, addresses)`` changes the answers at once."""

    def __init__(self) -> None:
        self.port = free_port()
        self._resolver = _Resolver()
        quiet = DNSLogger(log="-request,-reply,-truncated,-error,-recv,-send,-data", prefix=False)
        self._server = DNSServer(
            self._resolver, port=self.port, address="127.0.0.1", tcp=False, logger=quiet
        )

    def set(self, name: str, addresses: list[str]) -> None:
        with self._resolver.lock:
            self._resolver.names[name] = list(addresses)

    def target(self, name: str, port: int) -> str:
        return f"dns://127.0.0.1:{self.port}/{name}:{port}"

    def __enter__(self) -> DnsServer:
        self._server.start_thread()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self._server.stop()
